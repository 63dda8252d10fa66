"""The pyfunc model, logged from code and registered in a real MLflow store, loaded back by alias:
its scores equal the in-process model's for every file format, it unpickles nothing, the operating
threshold can be chosen per request, and versions logged as pickles are refused or read safely."""

from __future__ import annotations

import base64
import io
import logging
import pickle
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from data_layer.images import read_image
from data_layer.preprocessing import preprocess_images
from model.scoring import anomaly_maps
from tasks.registry.mlflow_model import (
    HEATMAP_SATURATION,
    DPAPyfuncModel,
    LegacyModelError,
    decode_heatmap,
    load_champion,
    load_dpa_scorer,
    load_reference_scores,
    load_scorer,
    log_dpa_model,
)
from tasks.registry.model_code import MODE_ENV, ModelCodeMismatch
from tasks.registry.pyfunc_model import INTERNAL_FAILURE, SERVING_CONFIG, WEIGHTS, ServingConfig
from tasks.serving.request import PATH_ROOT_ENV, PATHS_DISABLED
from tests.pipeline.conftest import INPUT_RULES, PREPROCESS, ImageSet, RegisteredDPA, register


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_champion_scores_equal_in_process_scores_for_bytes_and_allowed_paths(
    champion: RegisteredDPA, image_set: ImageSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PATH_ROOT_ENV, str(image_set.root))
    model = load_champion(champion.name)
    expected = image_set.expected_scores(champion.dpa)
    by_bytes = model.predict(pd.DataFrame({"image": [b64(f) for f in image_set.files]}))
    by_path = model.predict(pd.DataFrame({"path": [f.relative_to(image_set.root).as_posix() for f in image_set.files]}))
    assert {f.suffix for f in image_set.files} == {".png", ".jpg", ".tif", ".npy", ".dcm"}
    np.testing.assert_allclose(by_bytes["anomaly_score"], expected, rtol=1e-5)
    np.testing.assert_allclose(by_path["anomaly_score"], expected, rtol=1e-5)
    assert by_bytes["is_anomaly"].tolist() == (expected > champion.threshold).tolist()
    assert (by_bytes["threshold"] == champion.threshold).all()
    assert "heatmap" not in by_bytes.columns


def test_paths_are_refused_without_an_allowed_root(champion: RegisteredDPA, image_set: ImageSet, monkeypatch) -> None:
    monkeypatch.delenv(PATH_ROOT_ENV, raising=False)
    model = load_champion(champion.name)
    messages = []
    for path in (str(image_set.files[0]), "/etc/passwd", "/etc/nonexistent"):
        with pytest.raises(MlflowException) as caught:
            model.predict(pd.DataFrame({"path": [path]}))
        messages.append(caught.value.message)
    assert messages == [f"row 0: {PATHS_DISABLED}"] * 3


def test_heatmap_is_the_map_in_threshold_units(champion: RegisteredDPA, image_set: ImageSet) -> None:
    files = image_set.files[:3]
    out = load_champion(champion.name).predict(pd.DataFrame({"image": [b64(f) for f in files]}), params={"heatmap": True})
    maps = anomaly_maps(champion.dpa, preprocess_images([read_image(f) for f in files], PREPROCESS))
    for cell, expected in zip(out["heatmap"], maps):
        decoded = decode_heatmap(cell)
        assert decoded.shape == (16, 16)
        reference = np.clip(expected.numpy() / champion.threshold, 0, HEATMAP_SATURATION)
        np.testing.assert_allclose(decoded, reference, atol=HEATMAP_SATURATION / 255)


def test_a_fault_of_the_server_answers_500_without_the_traceback(champion: RegisteredDPA, image_set: ImageSet) -> None:
    scorer = load_dpa_scorer(champion.champion_uri)
    scorer.dpa = None  # a broken server, not a bad request
    with pytest.raises(MlflowException) as caught:
        scorer.predict(None, pd.DataFrame({"image": [b64(image_set.files[0])]}))
    assert caught.value.get_http_status_code() == 500 and caught.value.message == INTERNAL_FAILURE
    assert "stack_trace" not in caught.value.serialize_as_json()


def test_bad_rows_are_named_in_one_error(champion: RegisteredDPA, image_set: ImageSet) -> None:
    rows = pd.DataFrame({
        "image": [b64(image_set.files[0]), base64.b64encode(b"not an image").decode(), "%%%", None, 7],
        "path": [None, None, None, None, None],
    })
    with pytest.raises(MlflowException) as caught:
        load_champion(champion.name).predict(rows)
    message = str(caught.value)
    assert "row 0" not in message
    assert "row 1: the bytes are not a PNG" in message and "row 2: column 'image' is not valid base64" in message
    assert "row 3: give exactly one of the columns" in message and "row 4: column 'image' must be a string, got int" in message


def test_served_images_the_training_gate_would_refuse_are_named_and_not_scored(champion: RegisteredDPA, image_set: ImageSet) -> None:
    def png(array: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    rows = pd.DataFrame({"image": [b64(image_set.files[0]), png(np.zeros((4, 40), np.uint8)), png(np.full((20, 20), 9, np.uint8))]})
    with pytest.raises(MlflowException) as caught:
        load_champion(champion.name).predict(rows)
    message = str(caught.value)
    assert "row 0" not in message and "row 1: refused: 40x4 px, below the 16 px minimum side" in message
    assert "row 2: refused: blank (one grey level, 9)" in message


def test_threshold_and_specificity_params_set_the_operating_point(champion: RegisteredDPA, image_set: ImageSet) -> None:
    model = load_champion(champion.name)
    frame = pd.DataFrame({"image": [b64(f) for f in image_set.files]})
    scores = model.predict(frame)["anomaly_score"].to_numpy()
    cut = float(np.median(scores))
    by_threshold = model.predict(frame, params={"threshold": cut})
    assert by_threshold["is_anomaly"].tolist() == (scores > cut).tolist() and (by_threshold["threshold"] == cut).all()
    at_registered = model.predict(frame, params={"specificity": 0.95})
    assert at_registered["threshold"].iloc[0] == pytest.approx(champion.threshold)
    strict = model.predict(frame, params={"specificity": 0.5})
    assert strict["threshold"].iloc[0] == pytest.approx(np.quantile(champion.normal_scores, 0.5))
    for params, words in (({"threshold": 1.0, "specificity": 0.9}, "not both"), ({"specificity": 1.5}, r"in \[0, 1\]")):
        with pytest.raises(MlflowException, match=words):
            model.predict(frame, params=params)


def test_batch_scorer_takes_the_same_operating_point(champion: RegisteredDPA) -> None:
    assert load_dpa_scorer(champion.champion_uri).threshold == pytest.approx(champion.threshold)
    assert load_dpa_scorer(champion.champion_uri, threshold=0.25).threshold == 0.25
    reference = load_reference_scores(champion.champion_uri)
    assert load_dpa_scorer(champion.champion_uri, specificity=0.99).threshold == pytest.approx(reference.threshold_at(0.99))
    assert reference.scores == pytest.approx(list(champion.normal_scores)) and reference.quantile == 0.95


def test_registered_model_is_logged_from_code(champion: RegisteredDPA) -> None:
    info = mlflow.models.get_model_info(champion.champion_uri)
    assert {c.name for c in info.signature.inputs.inputs} == {"image", "path"}
    assert {p.name for p in info.signature.params.params} == {"heatmap", "threshold", "specificity"}
    assert info.metadata["threshold"] == pytest.approx(champion.threshold)
    local = Path(mlflow.artifacts.download_artifacts(champion.champion_uri))
    flavor = mlflow.models.Model.load(local).flavors["python_function"]
    assert Path(flavor["model_code_path"]).name == "dpa_model_code.py" and "python_model" not in flavor
    assert not list(local.rglob("*.pkl")) and (local / "artifacts" / "reference_scores.json").is_file()
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert load_champion(champion.name).predict(example)["anomaly_score"].notna().all()
    for package in ("model", "data_layer", "tasks"):
        assert (local / "code" / package / "__init__.py").is_file()


def test_loading_unpickles_nothing(champion: RegisteredDPA, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during model load")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
    assert load_champion(champion.name).unwrap_python_model().threshold == pytest.approx(champion.threshold)


def test_logging_prints_no_cloudpickle_warning(tiny_dpa, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    warnings = []
    monkeypatch.setattr(mlflow.pyfunc._logger, "warning", lambda msg, *args, **kw: warnings.append(str(msg)))
    with mlflow.start_run():
        log_dpa_model(tiny_dpa, PREPROCESS, 1.0, "dpa-no-pickle", "rule", normal_scores=[0.5, 1.0],
                      normal_source="normal validation images", quantile=0.95, input_rules=INPUT_RULES)
    assert not [w for w in warnings if "CloudPickle" in w]


def test_a_version_logged_as_a_pickle_is_refused_or_read_without_unpickling(
    champion: RegisteredDPA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `log_dpa_model` wrote before models from code: the instance pickled by CloudPickle."""
    source = Path(mlflow.artifacts.download_artifacts(champion.champion_uri)) / "artifacts"
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=DPAPyfuncModel(),
            artifacts={WEIGHTS: str(source / "dpa.pt"), SERVING_CONFIG: str(source / "serving_config.json")},
        )
    with pytest.raises(LegacyModelError, match="logged before models from code.*Retrain it"):
        load_scorer(info.model_uri)
    monkeypatch.setattr(cloudpickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    scorer = load_dpa_scorer(info.model_uri)
    assert scorer.threshold == ServingConfig.model_validate_json((source / "serving_config.json").read_text()).threshold
    with pytest.raises(ValueError, match="no stored reference scores"):
        scorer.operating_threshold(specificity=0.9)
    with pytest.raises(LegacyModelError, match="no reference_scores.json.*retrain it"):
        load_reference_scores(info.model_uri)


def test_logging_needs_an_active_run(tiny_dpa, mlflow_store: str) -> None:
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_dpa_model(tiny_dpa, PREPROCESS, 1.0, "never-registered", "rule", normal_scores=[1.0],
                      normal_source="x", quantile=0.95, input_rules=INPUT_RULES)


def test_an_in_process_load_names_code_that_differs_from_the_versions_and_can_refuse(
    tiny_dpa, mlflow_store: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh version matches this checkout: no warning. Then its stored copy of model/scoring.py is
    edited, as if the checkout had moved on since it was logged: the load names that file, and
    DPA_MODEL_CODE=refuse refuses it. sys.path does not grow with loads."""
    name = f"dpa-code-{uuid.uuid4().hex[:8]}"
    uri = f"models:/{name}/{register(tiny_dpa, name)}"
    path_before = list(sys.path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.registry.model_code"):
        load_dpa_scorer(uri)
        load_scorer(uri)
    assert not [r for r in caplog.records if r.name == "tasks.registry.model_code"] and sys.path == path_before

    version = MlflowClient().get_model_version(name, uri.rsplit("/", 1)[1])
    logged = MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    scoring = next(Path(urlparse(logged.artifact_location).path).rglob("code/model/scoring.py"))  # the store's copy
    scoring.write_text(scoring.read_text() + "\n# changed after the version was logged\n")
    with caplog.at_level(logging.WARNING, logger="tasks.registry.model_code"):
        scorer = load_dpa_scorer(uri)
    assert scorer.threshold == 1.0  # loaded, with a warning naming the file
    assert [r.getMessage() for r in caplog.records if "model/scoring.py differ" in r.getMessage()], caplog.text
    monkeypatch.setenv(MODE_ENV, "refuse")
    with pytest.raises(ModelCodeMismatch, match=r"model/scoring.py differ.*git_commit"):
        load_dpa_scorer(uri)
    assert sys.path == path_before
