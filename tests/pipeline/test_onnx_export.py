"""`dpa export`: the ONNX scoring graph scores what PyTorch scores (ONNX Runtime, CPU), on the demo
preset's network and on a trained version's own test split; a tampered graph is refused with the
figure, and leaves nothing behind."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
from mlflow import MlflowClient
from onnx import numpy_helper
from typer.testing import CliRunner

import tasks.registry.onnx_export as onnx_export
from data_layer.images import read_image
from flows.cli import app
from model.dpa import DPA
from model.scoring import anomaly_maps, score_images
from tasks.config import PipelineParams, resolve_run_config
from tasks.registry.mlflow_model import load_dpa_scorer, log_dpa_model
from tasks.registry.onnx_export import ExportParityError, export_version
from tasks.training.metrics import VAL_NORMALS, threshold_rule
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import ImageSet, RegisteredDPA
from tests.tiny import tiny_training


@pytest.fixture(scope="module")
def demo_network(mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The demo preset's network (its resolution, VGG layers and channel mask; random weights: parity
    does not depend on training), registered like a trained version, and 12 demo-sized images."""
    cfg = resolve_run_config(PipelineParams(preset="demo", overrides={"dpa.loss.vgg_weights": "random"}))
    dpa = DPA.build(cfg.dpa).eval()
    folder = tmp_path_factory.mktemp("demo-images")
    for i, image in enumerate(blob_images(12, cfg.preprocess.size, seed=21)):
        np.save(folder / f"{i}.npy", image[0].numpy())
    normals = score_images(dpa, blob_images(20, cfg.preprocess.size, seed=22)).tolist()
    name = f"dpa-demo-export-{uuid.uuid4().hex[:6]}"
    with mlflow.start_run():
        info = log_dpa_model(dpa, cfg.preprocess, float(np.quantile(normals, 0.95)), name, threshold_rule(0.95),
                             normal_scores=normals, normal_source=VAL_NORMALS, quantile=0.95, input_rules=cfg.validation)
    return f"models:/{name}/{info.registered_model_version}", folder


def test_the_demo_network_exports_with_parity_a_dynamic_batch_and_a_sidecar(demo_network: tuple[str, Path], tmp_path: Path) -> None:
    uri, images = demo_network
    result = CliRunner().invoke(app, ["export", uri, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert "on 12 images: max relative score difference" in result.output
    sidecar = json.loads((tmp_path / "onnx" / "model.json").read_text())
    size = resolve_run_config(PipelineParams(preset="demo")).preprocess.size
    assert sidecar["model_uri"] == uri and sidecar["input"]["shape"] == ["batch", 1, size, size]
    assert sidecar["parity"]["images"] == 12 and sidecar["parity"]["max_relative_difference"] <= 1e-4
    assert sidecar["threshold"] == pytest.approx(sidecar["threshold_at_specificity"]["0.95"])

    scorer = load_dpa_scorer(uri)
    batch = scorer.prepare([read_image(f) for f in sorted(images.glob("*.npy"))])
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 5, 12):  # the batch axis is dynamic
        (scores,) = session.run(["anomaly_score"], {"images": batch[:size].numpy()})
        np.testing.assert_allclose(scores, score_images(scorer.dpa, batch[:size]).numpy(), rtol=1e-4)

    run_id = MlflowClient().get_model_version(*uri.removeprefix("models:/").split("/")).run_id
    assert {a.path for a in MlflowClient().list_artifacts(run_id, "onnx")} == {"onnx/model.onnx", "onnx/model.json"}
    assert MlflowClient().get_run(run_id).data.metrics["onnx_parity_max_relative_difference"] <= 1e-4


def test_heat_maps_can_be_exported_too(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    export_version(champion.champion_uri, tmp_path, heatmaps=True, images_dir=image_set.root)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = load_dpa_scorer(champion.champion_uri).prepare([read_image(f) for f in image_set.files])
    scores, maps = session.run(None, {"images": batch.numpy()})
    np.testing.assert_allclose(maps, anomaly_maps(champion.dpa, batch).numpy(), rtol=1e-4, atol=1e-6)
    assert scores.shape == (len(image_set.files),) and json.loads((tmp_path / "model.json").read_text())["outputs"] == [
        "anomaly_score", "anomaly_map"]


def test_a_tampered_graph_is_refused_with_the_figure_and_nothing_is_kept(
    champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = onnx_export.export_onnx

    def tampered(*args, **kwargs) -> None:
        real(*args, **kwargs)
        path = args[3]
        graph = onnx.load(str(path))
        weight = next(t for t in graph.graph.initializer if numpy_helper.to_array(t).ndim == 4)  # a convolution
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(onnx_export, "export_onnx", tampered)
    run_id = MlflowClient().get_model_version(champion.name, champion.version).run_id
    logged = len(MlflowClient().get_metric_history(run_id, "onnx_parity_max_relative_difference"))
    with pytest.raises(ExportParityError, match=r"differ from PyTorch's by up to \d.*tolerance 0\.0001.*nothing was exported"):
        export_version(champion.champion_uri, tmp_path / "out", images_dir=image_set.root)
    assert not (tmp_path / "out").exists()
    assert len(MlflowClient().get_metric_history(run_id, "onnx_parity_max_relative_difference")) == logged  # nothing logged


def test_without_images_the_export_checks_the_versions_own_test_split(project: Path, prefect_server) -> None:
    from flows.training import training_pipeline

    name = f"flow-{uuid.uuid4().hex[:8]}"
    trained = training_pipeline(PipelineParams.model_validate(tiny_training(name, **{"registry.auroc_floor": 0.0})))
    result = export_version(f"models:/{name}/{trained['version']}", project / "export")
    assert result.images == 28 and result.max_relative_difference <= 1e-4  # the tiny preset's 28 test images
