"""Batch scoring: a dataset, a messy folder (suffix-less DICOM, a corrupt file, a non-image), the
re-scorer used by promotion, and one run of the Prefect flow with its summary artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.exceptions import ParameterTypeError
from typer.testing import CliRunner

from data_layer.images import read_image
from flows.cli import app, user_error
from flows.scoring import batch_scoring
from tasks.registry.mlflow_model import SCORE, load_dpa_scorer
from tasks.serving.journal import resolve_model
from tasks.serving.run_folders import run_folder
from tasks.serving.scoring import NothingScored, list_inputs, score_inputs
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import ImageSet, RegisteredDPA


def test_dataset_scores_labels_and_heatmaps(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    csv = score_inputs(champion.champion_uri, str(image_set.root), str(tmp_path / "out"))
    scores = pd.read_csv(csv, keep_default_na=False)
    assert list(scores.columns) == [
        "path", "anomaly_score", "is_anomaly", "threshold", "label", "group", "heatmap", "error", "model_uri", "model_version",
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
    csv = batch_scoring(input=str(image_set.root), out=str(tmp_path / "out"), model_uri=champion.champion_uri, chunk_size=3,
                        monitor=False)  # test_monitoring monitors these images with this champion
    assert Path(csv).parent.name.endswith(f"_{champion.name}-v{champion.version}")
    scores = pd.read_csv(csv, dtype=str)
    assert len(scores) == len(image_set.files) and set(scores["threshold"]) == {repr(champion.threshold)}
    with pytest.raises(ParameterTypeError, match="chunk_size"):
        batch_scoring(input=str(image_set.root), out=str(tmp_path / "zero"), model_uri=champion.champion_uri, chunk_size=0)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch-scoring-summary"])))
    table = {row["metric"]: row["value"] for row in json.loads(artifacts[-1].data)}
    assert table["images"] == str(len(image_set.files)) and table["not scored (see error column)"] == "0"
    assert "AUROC (manifest labels)" in table


def test_each_flow_run_writes_a_folder_per_day_and_version_and_scores_only_what_is_new(
    prefect_server: None, champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path
) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "scores"
    inbox.mkdir()
    for file in image_set.files[:3]:
        shutil.copy(file, inbox / file.name)
    model = resolve_model(champion.champion_uri)
    yesterday = run_folder(out, model, date(2026, 1, 1))
    assert yesterday.name == f"2026-01-01_{champion.name}-v{champion.version}"
    score_inputs(model.uri, str(inbox), str(yesterday), heatmaps=False)  # an earlier day's run

    assert batch_scoring(input=str(inbox), out=str(out), model_uri=champion.champion_uri, monitor=False) == ""  # nothing new
    shutil.copy(image_set.files[3], inbox / image_set.files[3].name)
    (inbox / image_set.files[0].name).write_bytes(image_set.files[4].read_bytes())  # an edited file is new again
    csv = Path(batch_scoring(input=str(inbox), out=str(out), model_uri=champion.champion_uri, monitor=False))
    assert csv.parent == run_folder(out, model, datetime.now(UTC).date())
    today = pd.read_csv(csv, keep_default_na=False)
    assert sorted(today["path"]) == sorted([image_set.files[0].name, image_set.files[3].name])
    assert len(pd.read_csv(yesterday / "scores.csv")) == 3  # the earlier folder is left as it was


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


def test_tiny_and_blank_images_are_refused_with_their_reason_and_not_scored(
    champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path
) -> None:
    """The training gate's per-image rules at the door: the model was trained with 16 px as the
    smallest side (conftest INPUT_RULES), so a 2x2 image and a blank one are refused, not scored."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.fromarray(np.full((2, 2), 90, np.uint8)).save(inbox / "tiny.png")
    Image.fromarray(np.full((32, 32), 170, np.uint8)).save(inbox / "blank.png")
    shutil.copy(next(f for f in image_set.files if f.suffix == ".png"), inbox / "good.png")
    scores = pd.read_csv(score_inputs(champion.champion_uri, str(inbox), str(tmp_path / "out")), keep_default_na=False).set_index("path")
    assert "2x2 px, below the 16 px minimum side" in scores.at["tiny.png", "error"]
    assert "blank (one grey level, 170)" in scores.at["blank.png", "error"]
    assert scores.loc[["tiny.png", "blank.png"], ["anomaly_score", "is_anomaly", "heatmap"]].eq("").all().all()
    assert scores.at["good.png", "error"] == "" and float(scores.at["good.png", "anomaly_score"]) > 0


def test_one_hot_pixel_does_not_move_the_score_of_a_16bit_image(champion: RegisteredDPA, tmp_path: Path) -> None:
    """A 12-bit image saved as 16-bit PNG, then the same with one stuck pixel at 65535: its score moves
    by a small fraction of the spread of normal scores (the old min..max scaling moved it by many spreads)."""
    scorer = load_dpa_scorer(champion.champion_uri)
    blob = blob_images(1, 32, seed=7)[0, 0].numpy().astype(np.uint16) * 16  # 12-bit values
    hot = blob.copy()
    hot[3, 4] = 65535
    files = [tmp_path / "clean.png", tmp_path / "hot.png"]
    for array, file in zip((blob, hot), files):
        Image.fromarray(array).save(file)
    clean, spoiled = (float(scorer.score(scorer.prepare([read_image(f)]))[SCORE].iloc[0]) for f in files)
    spread = float(np.std(champion.normal_scores))
    old = (hot.astype(float) - hot.min()) / (hot.max() - hot.min()) * 255
    min_max = float(scorer.score(scorer.prepare([Image.fromarray(np.rint(old).astype(np.uint8))]))[SCORE].iloc[0])
    assert abs(spoiled - clean) < 0.25 * spread, (clean, spoiled, spread)
    assert abs(min_max - clean) > 2 * spread, (clean, min_max, spread)
