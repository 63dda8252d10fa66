"""The pyfunc model, logged and registered in a real MLflow store, loaded back by alias: its scores
equal the in-process model's for every file format, by bytes or by path."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from data_layer.images import read_image
from data_layer.preprocessing import preprocess_images
from model.scoring import anomaly_maps
from tasks.mlflow_model import HEATMAP_SATURATION, decode_heatmap, load_champion, log_dpa_model
from tests.pipeline.conftest import PREPROCESS, ImageSet, RegisteredDPA


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_champion_scores_equal_in_process_scores_for_bytes_and_paths(champion: RegisteredDPA, image_set: ImageSet) -> None:
    model = load_champion(champion.name)
    expected = image_set.expected_scores(champion.dpa)
    by_bytes = model.predict(pd.DataFrame({"image": [b64(f) for f in image_set.files]}))
    by_path = model.predict(pd.DataFrame({"path": [str(f) for f in image_set.files]}))
    assert {f.suffix for f in image_set.files} == {".png", ".jpg", ".tif", ".npy", ".dcm"}
    np.testing.assert_allclose(by_bytes["anomaly_score"], expected, rtol=1e-5)
    np.testing.assert_allclose(by_path["anomaly_score"], expected, rtol=1e-5)
    assert by_bytes["is_anomaly"].tolist() == (expected > champion.threshold).tolist()
    assert "heatmap" not in by_bytes.columns


def test_heatmap_is_the_map_in_threshold_units(champion: RegisteredDPA, image_set: ImageSet) -> None:
    out = load_champion(champion.name).predict(pd.DataFrame({"path": [str(f) for f in image_set.files[:3]]}), params={"heatmap": True})
    maps = anomaly_maps(champion.dpa, preprocess_images([read_image(f) for f in image_set.files[:3]], PREPROCESS))
    for cell, expected in zip(out["heatmap"], maps):
        decoded = decode_heatmap(cell)
        assert decoded.shape == (16, 16)
        reference = np.clip(expected.numpy() / champion.threshold, 0, HEATMAP_SATURATION)
        np.testing.assert_allclose(decoded, reference, atol=HEATMAP_SATURATION / 255)


def test_bad_rows_are_named_in_one_error(champion: RegisteredDPA, image_set: ImageSet) -> None:
    rows = pd.DataFrame({
        "image": [b64(image_set.files[0]), base64.b64encode(b"not an image").decode(), "%%%", None],
        "path": [None, None, None, None],
    })
    with pytest.raises(MlflowException) as caught:
        load_champion(champion.name).predict(rows)
    message = str(caught.value)
    assert "row 0" not in message
    assert "row 1: the bytes are not a PNG" in message and "row 2: column 'image' is not valid base64" in message
    assert "row 3: give exactly one of the columns" in message


def test_registered_model_carries_signature_example_and_code(champion: RegisteredDPA) -> None:
    info = mlflow.models.get_model_info(champion.champion_uri)
    assert {c.name for c in info.signature.inputs.inputs} == {"image", "path"}
    assert info.signature.params.params[0].name == "heatmap"
    assert info.metadata["threshold"] == pytest.approx(champion.threshold)
    local = mlflow.artifacts.download_artifacts(champion.champion_uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert load_champion(champion.name).predict(example)["anomaly_score"].notna().all()
    for package in ("model", "data_layer", "tasks"):
        assert (Path(local) / "code" / package / "__init__.py").is_file()


def test_logging_needs_an_active_run(tiny_dpa, mlflow_store: str) -> None:
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_dpa_model(tiny_dpa, PREPROCESS, 1.0, "never-registered", "rule")
