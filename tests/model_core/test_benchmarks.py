"""The benchmark scripts run: the throughput table's fields, and gpu_check's clean CPU exit."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_gpu_check_exits_cleanly_without_cuda() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
        env=_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable),
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA device on this machine" in out.stdout
    assert "gpu_check summary" not in out.stdout  # nothing ran


def test_train_throughput_prints_one_row_per_variant() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--preset", "demo", "--batch-size", "4",
           "--iters", "1", "--warmup", "1", "--n-images", "8", "--cache", "both", "--device", "cpu", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("preset=demo")]
    assert [re.search(r"cache=(\w+)", r).group(1) for r in rows] == ["True", "False"]
    for row in rows:
        fields = dict(kv.split("=", 1) for kv in row.split())
        assert float(fields["images_per_s"]) > 0 and float(fields["ms_per_step"]) > 0 and float(fields["tflops"]) > 0


def test_onnx_throughput_prints_both_paths_and_their_agreement() -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "onnx_throughput.py"), "--images", "8", "--batch", "4", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    rates = re.findall(r"\| (pyfunc \(PyTorch fp32\)|ONNX Runtime CPU) \| ([\d,.]+) \|", out.stdout)
    assert [name for name, _ in rates] == ["pyfunc (PyTorch fp32)", "ONNX Runtime CPU"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)
    assert float(re.search(r"max relative score difference (\S+)", out.stdout).group(1)) <= 1e-4
