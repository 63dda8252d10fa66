"""A person's mistake at the `dpa` command line prints one line that names the problem and the fix,
and exits 2; `--debug` shows the traceback. Run as the installed console script, as a person runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DPA = Path(sys.executable).with_name("dpa")


def dpa(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPA_PROJECT_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PREFECT_API_URL": ""}
    return subprocess.run([str(DPA), *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["score", "--input", "/nonexistent", "--model", "models:/x/1"], "/nonexistent: no such file or directory. Give a folder"),
        (["score", "--input", ".", "--model", "models:/nope@champion"], "Registered Model with name=nope not found. Name a registered model"),
        (["train", "--preset", "nope"], "unknown preset 'nope'; known presets: "),
        (["data", "promote", "nope"], "datasets/nope.dvc: no nope dataset is tracked"),
    ],
    ids=["missing-input", "unknown-model", "unknown-preset", "unknown-workspace"],
)
def test_a_user_error_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")  # an input for the unknown-model case
    result = dpa(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = dpa(tmp_path, "--debug", "score", "--input", "/nonexistent", "--model", "models:/x/1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
