"""Batch scoring: a dataset, a messy folder (suffix-less DICOM, a corrupt file, a non-image), the
re-scorer used by promotion, and one run of the Prefect flow with its summary artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.exceptions import ParameterTypeError
from typer.testing import CliRunner

from flows.cli import app, user_error
from flows.scoring import batch_scoring
from tasks.serving.scoring import NothingScored, list_inputs, score_inputs
from tests.pipeline.conftest import ImageSet, RegisteredDPA


def test_dataset_scores_labels_and_heatmaps(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    csv = score_inputs(champion.champion_uri, str(image_set.root), str(tmp_path / "out"))
    scores = pd.read_csv(csv, keep_default_na=False)
    assert list(scores.columns) == [
        "path", "anomaly_score", "is_anomaly", "threshold", "label", "heatmap", "error", "model_uri", "model_version",
        "input_digest",
    ]
    assert set(scores["model_uri"]) == {f"models:/{champion.name}/{champion.version}"}
    assert set(scores["model_version"].astype(str)) == {champion.version}
    assert scores["input_digest"].tolist() == [hashlib.sha256(f.read_bytes()).hexdigest() for f in image_set.files]
    assert scores["path"].tolist() == [f.relative_to(image_set.root).as_posix() for f in image_set.files]
    np.testing.assert_allclose(scores["anomaly_score"], image_set.expected_scores(champion.dpa), rtol=1e-5)
    assert scores["label"].tolist() == image_set.labels and (scores["error"] == "").all()
    for heatmap in scores["heatmap"]:
        with Image.open(tmp_path / "out" / heatmap) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (16, 16))


def test_folder_with_bad_and_foreign_files(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    folder = tmp_path / "pacs"
    dicom = next(f for f in image_set.files if f.suffix == ".dcm")
    png = next(f for f in image_set.files if f.suffix == ".png")
    (folder / "series1").mkdir(parents=True)
    shutil.copy(dicom, folder / "series1" / "IM0001")  # PACS exports often drop suffixes
    shutil.copy(png, folder / "a.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "README.txt").write_text("not an image")
    scores = pd.read_csv(score_inputs(champion.champion_uri, str(folder), str(tmp_path / "out"), heatmaps=False), keep_default_na=False)
    assert scores["path"].tolist() == ["a.png", "broken.png", "series1/IM0001"]
    assert "heatmap" not in scores.columns and "label" not in scores.columns
    broken = scores.set_index("path").loc["broken.png"]
    assert broken["anomaly_score"] == "" and "broken.png: cannot decode" in broken["error"]
    expected = ImageSet(image_set.root, [png, dicom], []).expected_scores(champion.dpa)
    np.testing.assert_allclose(scores.loc[scores["error"] == "", "anomaly_score"].astype(float), expected, rtol=1e-5)


def test_inputs_that_hold_no_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list_inputs(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files found"):
        list_inputs(tmp_path)


def test_batch_scoring_flow_writes_scores_and_publishes_summary(
    prefect_server: None, champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path
) -> None:
    csv = batch_scoring(input=str(image_set.root), out=str(tmp_path / "out"), model_uri=champion.champion_uri, chunk_size=3)
    scores = pd.read_csv(csv, dtype=str)
    assert len(scores) == len(image_set.files) and set(scores["threshold"]) == {repr(champion.threshold)}
    with pytest.raises(ParameterTypeError, match="chunk_size"):
        batch_scoring(input=str(image_set.root), out=str(tmp_path / "zero"), model_uri=champion.champion_uri, chunk_size=0)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch-scoring-summary"])))
    table = {row["metric"]: row["value"] for row in json.loads(artifacts[-1].data)}
    assert table["images"] == str(len(image_set.files)) and table["not scored (see error column)"] == "0"
    assert "AUROC (manifest labels)" in table


def test_a_folder_where_nothing_can_be_scored_fails_and_keeps_the_reasons(champion: RegisteredDPA, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.png", "b.png", "c.dcm"):
        (inbox / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(NothingScored, match=r"none of the 3 input file\(s\) under .*inbox could be scored") as refused:
        score_inputs(champion.champion_uri, str(inbox), str(tmp_path / "out"))
    scores = pd.read_csv(tmp_path / "out" / "scores.csv", keep_default_na=False)
    assert len(scores) == 3 and (scores["error"] != "").all()  # the reasons are kept
    assert user_error(refused.value).startswith("none of the 3 input file(s)")  # `dpa score`: one line, exit 2
    result = CliRunner().invoke(app, ["score", "--model", champion.champion_uri, "--input", str(inbox), "--out", str(tmp_path / "cli")])
    assert result.exit_code != 0 and isinstance(result.exception, NothingScored)
