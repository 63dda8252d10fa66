"""DDP on CPU (gloo, 127.0.0.1): 2 ranks × B/2 take the steps of 1 process × B, a 2-rank run
stopped and resumed from its checkpoint ends exactly where an uninterrupted 2-rank run does, and a
compile failure fails the job."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.distributed import no_buffer_sync, process_group
from model.dpa import load_dpa, save_dpa
from model.trainer import Trainer, seeded_dpa
from tests.model_core.conftest import blob_images, tiny_config

INITIAL = "initial.pt"
STOP_AT = 7  # mid-transition: the α ramp, the sampler's plan and Adam's moments all resume


def _config(nproc: int, **train):
    """20 steps with progressive growing: stab@8 (cached features; the 16 heads unused), trns@16
    (the smooth loss), stab@16."""
    return tiny_config(res=16, initial_res=8, stab_iters=5, trns_iters=5, iters_per_res={16: {"stab": 10}},
                       batch_size=8, log_every=5, nproc_per_node=nproc, **train)


def _images() -> torch.Tensor:
    return blob_images(20, 16, seed=1)  # 20 images, batch 8: a new epoch plan every 2 steps


def _rank(rank: int, port: int, out: Path) -> None:
    """Train 2 ranks through STOP_AT with a checkpoint, resume a second trainer from it while the
    first goes on uninterrupted; rank 0 saves both results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    cfg, images = _config(2), _images()
    with process_group(torch.device("cpu")):
        full = Trainer(cfg, images, checkpoint_dir=out, progress=False, dpa=load_dpa(out / INITIAL))
        full.fit(until=STOP_AT)
        dist.barrier()  # rank 0 has written the checkpoint every rank resumes from
        resumed = Trainer(cfg, images, checkpoint_dir=out, progress=False, dpa=load_dpa(out / INITIAL))
        assert resumed.iteration == STOP_AT
        full.checkpoint_dir = None  # the uninterrupted run goes on without overwriting it
        weights = {"full": full.fit().state_dict(), "resumed": resumed.fit().state_dict()}
        if rank == 0:
            torch.save(weights, out / "weights.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_and_resume_exactly(tmp_path: Path) -> None:
    save_dpa(seeded_dpa(_config(2)), tmp_path / INITIAL)  # built once: the ranks skip building VGG19
    mp.spawn(_rank, args=(_free_port(), tmp_path), nprocs=2)
    ranks = torch.load(tmp_path / "weights.pt", weights_only=True)
    one = Trainer(_config(1), _images(), progress=False)
    initial = {k: v.clone() for k, v in one.dpa.state_dict().items()}
    one = one.fit().state_dict()
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-2 and one.keys() == ranks["full"].keys()  # the steps really moved the weights
    for key in one:
        torch.testing.assert_close(ranks["full"][key], one[key], rtol=0, atol=1e-5, msg=key)
        assert torch.equal(ranks["resumed"][key], ranks["full"][key]), key


def _failing_compile(fn, **kwargs):
    def loss_fn(*args):
        raise RuntimeError("inductor failed")

    return loss_fn


def _rank_with_a_failing_compile(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.compile = _failing_compile
    with process_group(torch.device("cpu")):
        Trainer(_config(2, compile=True), _images(), progress=False, dpa=load_dpa(out / INITIAL)).fit()


def test_a_compile_failure_under_ddp_fails_the_job_instead_of_one_rank_falling_back(tmp_path: Path) -> None:
    """A rank redoing its step eagerly alone would desynchronise DDP's collectives."""
    save_dpa(seeded_dpa(_config(2)), tmp_path / INITIAL)
    with pytest.raises(mp.ProcessRaisedException, match=r"failed on rank \d \(RuntimeError: inductor failed\); "
                                                          r"DDP ranks cannot fall back to eager one by one: set train.compile: false"):
        mp.spawn(_rank_with_a_failing_compile, args=(_free_port(), tmp_path), nprocs=2)


def test_buffers_are_not_synced_per_step_under_the_ddp_of_any_supported_torch() -> None:
    """torch 2.11 (the GPU machines' image) has no `forward_sync_buffers`: DDP refused the keyword
    there, which only a CUDA run showed; the switch follows the installed DDP's signature."""

    def ddp_2_11(self, module, broadcast_buffers=True, find_unused_parameters=False):  # noqa: ANN001, ANN202
        ...

    def ddp_2_14(self, module, broadcast_buffers=None, forward_sync_buffers=None):  # noqa: ANN001, ANN202
        ...

    assert no_buffer_sync(ddp_2_11) == {"broadcast_buffers": False}
    assert no_buffer_sync(ddp_2_14) == {"forward_sync_buffers": False}
    assert no_buffer_sync(torch.nn.parallel.DistributedDataParallel.__init__) == {"forward_sync_buffers": False}
