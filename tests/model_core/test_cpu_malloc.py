"""model.cpu_malloc: freed activations are reused, not mapped afresh (what made CPU steps at 64×64 slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from model.cpu_malloc import GLIBC_TUNABLES
from tasks.training.distributed_training import _environment

REPO = Path(__file__).resolve().parents[2]
PAGE_FAULTS = """
import resource, sys, torch
from model.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
convs = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1))
x = torch.randn(32, 3, 64, 64, requires_grad=True)
step = lambda: convs(x).abs().mean().backward()  # activations of 32 MB, as VGG's first layers at 64×64
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_training_steps_reuse_freed_memory_instead_of_mapping_it_again() -> None:
    """Three forward/backward steps of two 64-channel convolutions at 64×64: with glibc's default
    every step maps and zeroes its activations afresh (494k page faults when measured); with kept
    memory they reuse the pages of the step before (25k)."""
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 200_000, default
    assert kept * 5 < default, (kept, default)


def test_deployments_and_torchrun_ranks_start_with_the_same_setting() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["work_pool"]["job_variables"]["env"]["GLIBC_TUNABLES"] for d in doc["deployments"]} == {GLIBC_TUNABLES}
    assert _environment(2)["GLIBC_TUNABLES"] == GLIBC_TUNABLES
