"""Crash-safe batch scoring with real `dpa score` processes: SIGKILL mid-run then rerun gives the
uninterrupted run's rows; SIGTERM stops after a chunk with exit 143; a finished folder is not
written again; an edited file is rescored; another model version, another threshold or a second
writer is refused."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock
from PIL import Image

from tasks.serving.journal import JOURNAL_CSV, LOCK_FILE, ScoringStateError, output_lock
from tasks.serving.scoring import SCORES_CSV, score_inputs
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import RES, RegisteredDPA, register

REPO = Path(__file__).resolve().parents[2]
CHUNK = 8
N_IMAGES = 240


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough grey PNGs for 30 chunks, in two subfolders (the CSV order is the sorted paths)."""
    root = tmp_path_factory.mktemp("to-score")
    for i, image in enumerate(blob_images(N_IMAGES, 2 * RES, seed=5)):
        (root / f"s{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(root / f"s{i % 2}" / f"im{i:04d}.png")
    return root


def dpa_score(model_uri: str, folder: Path, out: Path) -> subprocess.Popen:
    """`dpa score` as a user runs it, in its own process (this worktree's code, this MLflow store)."""
    command = [str(Path(sys.executable).parent / "dpa"), "score", "--model", model_uri, "--input", str(folder),
               "--out", str(out), "--chunk-size", str(CHUNK)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def first_images(folder: Path, to: Path, n: int) -> Path:
    """A folder of copies of `folder`'s first `n` PNGs."""
    to.mkdir()
    for src in sorted(folder.rglob("*.png"))[:n]:
        (to / src.name).write_bytes(src.read_bytes())
    return to


def journal_rows(out: Path) -> int:
    file = out / JOURNAL_CSV
    return max(file.read_bytes().count(b"\n") - 1, 0) if file.is_file() else 0


def start_and_signal(model_uri: str, folder: Path, out: Path, sig: signal.Signals) -> tuple[int, str, int]:
    """Start `dpa score`, send `sig` once its first chunk is journaled; (exit code, output, rows at the signal)."""
    process = dpa_score(model_uri, folder, out)
    deadline = time.monotonic() + 120
    while journal_rows(out) == 0:
        assert process.poll() is None, f"dpa score ended before its first chunk:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "no chunk journaled within 120 s"
        time.sleep(0.005)
    rows_at_signal = journal_rows(out)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    return process.returncode, output, rows_at_signal


def run_to_end(model_uri: str, folder: Path, out: Path) -> tuple[int, str]:
    process = dpa_score(model_uri, folder, out)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


@pytest.fixture(scope="module")
def reference(champion: RegisteredDPA, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    return pd.read_csv(score_inputs(champion.champion_uri, str(folder), str(out), chunk_size=CHUNK), dtype=str, keep_default_na=False)


def assert_same_rows(scores: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert len(scores) == N_IMAGES and scores["path"].is_unique
    assert scores.drop(columns="anomaly_score").equals(reference.drop(columns="anomaly_score"))
    np.testing.assert_allclose(scores["anomaly_score"].astype(float), reference["anomaly_score"].astype(float), rtol=1e-6)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    champion: RegisteredDPA, folder: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, output, _ = start_and_signal(champion.champion_uri, folder, out, signal.SIGKILL)
    assert code == -signal.SIGKILL and not (out / SCORES_CSV).exists()
    kept = journal_rows(out)
    assert 0 < kept < N_IMAGES, f"the kill should land mid-run, {kept} of {N_IMAGES} rows journaled"
    with open(out / JOURNAL_CSV, "ab") as journal:  # what a crash in the middle of an append leaves
        journal.write(b"s0/im9999.png,0.12")
    heatmaps_before = {p: p.stat().st_mtime_ns for p in (out / "heatmaps").rglob("*.png")}
    code, output = run_to_end(champion.champion_uri, folder, out)
    assert code == 0, output
    assert f"{kept} of {N_IMAGES} files already scored" in output
    scores = pd.read_csv(out / SCORES_CSV, dtype=str, keep_default_na=False)
    assert_same_rows(scores, reference)
    assert b"im9999" not in (out / JOURNAL_CSV).read_bytes()
    assert journal_rows(out) == N_IMAGES  # every file journaled exactly once
    journaled = pd.read_csv(out / JOURNAL_CSV, dtype=str)
    assert journaled["path"].is_unique
    rewritten = [p for p, mtime in heatmaps_before.items() if p.stat().st_mtime_ns != mtime]
    assert len(rewritten) <= CHUNK, f"heat maps of journaled files were written again: {rewritten[:3]}"


def test_sigterm_stops_after_a_chunk_with_exit_143_and_the_rerun_completes(
    champion: RegisteredDPA, folder: Path, reference: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    code, output, at_signal = start_and_signal(champion.champion_uri, folder, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and time.monotonic() - started < 120
    assert at_signal <= journal_rows(out) <= at_signal + 2 * CHUNK < N_IMAGES  # the chunk in flight, then stop
    assert (out / JOURNAL_CSV).read_bytes().endswith(b"\n")  # flushed whole
    code, output = run_to_end(champion.champion_uri, folder, out)
    assert code == 0, output
    assert_same_rows(pd.read_csv(out / SCORES_CSV, dtype=str, keep_default_na=False), reference)


def test_rerun_of_a_finished_folder_writes_nothing_and_rescoring_follows_content(
    champion: RegisteredDPA, folder: Path, tmp_path: Path
) -> None:
    images = first_images(folder, tmp_path / "images", 5)
    out = tmp_path / "out"
    first = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), chunk_size=2), dtype=str)
    files = [out / JOURNAL_CSV, *(out / "heatmaps").rglob("*.png")]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), chunk_size=2), dtype=str)
    assert again.equals(first)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # no score and no heat map written twice

    edited = sorted(images.glob("*.png"))[0]
    Image.fromarray(np.full((2 * RES, 2 * RES), 200, np.uint8), mode="L").save(edited)
    third = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), chunk_size=2), dtype=str)
    assert third["path"].tolist() == first["path"].tolist()
    changed = third["input_digest"] != first["input_digest"]
    assert changed.tolist() == [True, False, False, False, False]
    assert third.loc[changed, "anomaly_score"].iloc[0] != first.loc[changed, "anomaly_score"].iloc[0]
    assert third[~changed].equals(first[~changed])


def test_another_model_version_in_the_folder_is_refused(
    champion: RegisteredDPA, folder: Path, tmp_path: Path
) -> None:
    images = first_images(folder, tmp_path / "images", 1)
    out = tmp_path / "out"
    score_inputs(f"models:/{champion.name}/{champion.version}", str(images), str(out), heatmaps=False)
    newer = register(champion.dpa, champion.name)
    with pytest.raises(ScoringStateError, match=f"holds scores of model version {champion.version} .*this run scores with version {newer}"):
        score_inputs(f"models:/{champion.name}/{newer}", str(images), str(out), heatmaps=False)
    (out / JOURNAL_CSV).unlink()  # the finished scores.csv alone is refused too
    with pytest.raises(ScoringStateError, match=f"holds scores of model version {champion.version}, not {newer}"):
        score_inputs(f"models:/{champion.name}/{newer}", str(images), str(out), heatmaps=False)


def test_a_resume_at_another_threshold_is_refused(champion: RegisteredDPA, folder: Path, tmp_path: Path) -> None:
    images = first_images(folder, tmp_path / "images", 2)
    out = tmp_path / "out"
    first = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), heatmaps=False, threshold=0.5), dtype=str)
    assert set(first["threshold"]) == {"0.5"}
    for other in ({}, {"specificity": 0.5}, {"threshold": 0.25}):
        with pytest.raises(ScoringStateError, match=r"taken at threshold 0\.5; this run applies threshold .*--specificity"):
            score_inputs(champion.champion_uri, str(images), str(out), heatmaps=False, **other)
    again = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), heatmaps=False, threshold=0.5), dtype=str)
    assert again.equals(first)


def test_a_second_writer_on_the_same_folder_is_refused(champion: RegisteredDPA, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        with pytest.raises(ScoringStateError, match="another scoring run is writing to"):
            score_inputs(champion.champion_uri, str(folder), str(out))
    gc.disable()  # released when the run ends, not when the garbage collector gets to the lock
    try:
        score_inputs(champion.champion_uri, str(folder), str(out), heatmaps=False)
        lock = FileLock(out / LOCK_FILE, timeout=0)
        lock.acquire()
        lock.release()
    finally:
        gc.enable()


def test_a_folder_begun_before_the_group_column_goes_on_without_it(champion: RegisteredDPA, folder: Path, tmp_path: Path) -> None:
    """An image folder scored by the code before `group` existed for folders: an upgrade resumes it."""
    images = first_images(folder, tmp_path / "images", 3)
    out = tmp_path / "out"
    first = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), heatmaps=False), dtype=str, keep_default_na=False)
    assert "group" in first and (first["group"] == "").all()  # PNGs name no patient
    old = first.drop(columns="group").iloc[:2]  # what that code had journaled when it was stopped
    (out / SCORES_CSV).unlink()
    old.to_csv(out / JOURNAL_CSV, index=False, lineterminator="\n")
    resumed = pd.read_csv(score_inputs(champion.champion_uri, str(images), str(out), heatmaps=False), dtype=str, keep_default_na=False)
    expected = first.drop(columns="group")
    assert list(resumed.columns) == list(expected.columns)
    assert resumed.drop(columns="anomaly_score").equals(expected.drop(columns="anomaly_score"))
    np.testing.assert_allclose(resumed["anomaly_score"].astype(float), expected["anomaly_score"].astype(float), rtol=1e-5)
