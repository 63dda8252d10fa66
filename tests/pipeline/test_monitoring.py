"""`dpa score` checks each batch for score drift (tasks.monitoring.monitor): one MLflow run per batch in
`<model>-monitoring`, tagged with the version and the batch's input digest; no event without a
Prefect server; `--no-monitor` turns it off; a version without reference scores is scored but not
monitored, and says so. The drift → event → retraining loop itself is in
tests/integration/test_deployments.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from PIL import Image
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.cli import app
from tasks.monitoring.drift import TOO_FEW, DriftLevels, drift_report
from tasks.monitoring.monitor import MONITORING_SUFFIX, REPORT_FILE, monitor_batch
from tasks.registry.mlflow_model import SERVING_CONFIG, WEIGHTS, DPAPyfuncModel
from tasks.serving.journal import JOURNAL_CSV
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import ImageSet, RegisteredDPA
from tests.pipeline.dicom_files import radiograph


def score(model_uri: str, image_set: ImageSet, out: Path, *options: str) -> str:
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no Prefect server, as on a laptop
        result = CliRunner().invoke(app, ["score", "--model", model_uri, "--input", str(image_set.root),
                                          "--out", str(out), "--no-heatmaps", *options])
    assert result.exit_code == 0, result.output
    return result.output


def monitoring_runs(model_name: str, out: Path | None = None) -> list:
    """The monitoring runs of a model (of one output folder, with `out`): other tests score the champion too."""
    experiment = MlflowClient().get_experiment_by_name(model_name + MONITORING_SUFFIX)
    where = f"tags.scores_csv = '{(out / 'scores.csv').resolve()}'" if out else ""
    return [] if experiment is None else MlflowClient().search_runs([experiment.experiment_id], where)


def test_dpa_score_logs_a_monitoring_run_per_batch(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    """Half the batch is anomalous (striped squares) against normal-only reference scores: drifted
    (at alpha 0.1: 8 images against 32 reference normals is little evidence)."""
    output = score(champion.champion_uri, image_set, tmp_path / "a", "--drift-min-batch", "8", "--drift-alpha", "0.1")
    assert "score drift: drifted" in output, output
    assert "tested one image per patient group (8 groups of 8 images)" in output  # the manifest's groups
    (run,) = monitoring_runs(champion.name, tmp_path / "a")
    scores = pd.read_csv(tmp_path / "a" / "scores.csv", dtype=str)
    assert run.data.tags["model_version"] == champion.version
    assert run.data.tags["model_uri"] == f"models:/{champion.name}/{champion.version}"
    assert run.data.tags["input_digest"] == hashlib.sha256("\n".join(sorted(scores["input_digest"])).encode()).hexdigest()
    assert run.data.tags["drifted"] == "True" and "prefect_event_id" not in run.data.tags  # nobody to tell
    assert run.data.params["drift_min_batch"] == "8" and run.data.params["drift_alpha"] == "0.1" and run.data.metrics["n"] == len(image_set.files)
    report = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=REPORT_FILE)).read_text())
    assert report["drifted"] and report["ks_pvalue"] == run.data.metrics["ks_pvalue"]
    assert report["n_reference"] == len(champion.normal_scores)

    # The same batch again: nothing new in this folder, and the same images elsewhere find the run.
    again = monitor_batch(tmp_path / "a" / "scores.csv", DriftLevels())
    assert again.report is None and "nothing new to monitor" in again.note
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "a" / "scores.csv", copy / "scores.csv")
    elsewhere = monitor_batch(copy / "scores.csv", DriftLevels())
    assert elsewhere.run_id == run.info.run_id and "already" in elsewhere.note and elsewhere.event_id is None
    assert monitoring_runs(champion.name, copy) == []
    # The default minimum batch is larger than these 8 images: no verdict, and no event either way.
    assert drift_report(scores["anomaly_score"].astype(float), champion.normal_scores, 1.0, DriftLevels()).verdict == TOO_FEW
    # Scores of a model outside the registry have no `<name>-monitoring` to go to.
    scores.assign(model_uri="runs:/0123/model").to_csv(tmp_path / "unregistered.csv", index=False)
    skipped = monitor_batch(tmp_path / "unregistered.csv")
    assert skipped.report is None and "SKIPPED: runs:/0123/model is not a registered model version" in skipped.note
    score(champion.champion_uri, image_set, tmp_path / "b", "--no-monitor")
    assert monitoring_runs(champion.name, tmp_path / "b") == []


def test_a_version_without_reference_scores_is_scored_but_not_monitored(
    champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path
) -> None:
    """A version logged before thresholds at inference (pickled, no reference_scores.json)."""
    source = Path(mlflow.artifacts.download_artifacts(champion.champion_uri)) / "artifacts"
    name = f"dpa-legacy-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model", python_model=DPAPyfuncModel(), registered_model_name=name, pip_requirements=[],
            artifacts={WEIGHTS: str(source / "dpa.pt"), SERVING_CONFIG: str(source / "serving_config.json")},
        )
    output = score(f"models:/{name}/1", image_set, tmp_path / "legacy", "--drift-min-batch", "8")
    assert "score-drift monitoring SKIPPED" in output and "no reference_scores.json" in output, output
    assert len(pd.read_csv(tmp_path / "legacy" / "scores.csv")) == len(image_set.files)
    assert monitoring_runs(name) == []


def test_a_growing_inbox_is_monitored_on_the_images_new_since_the_last_run(
    champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first, later = image_set.files[:5], image_set.files[5:]
    for file in first:
        shutil.copy(file, inbox / file.name)
    out = tmp_path / "out"
    score(champion.champion_uri, ImageSet(inbox, [], []), out, "--drift-min-batch", "2")
    for file in later:
        shutil.copy(file, inbox / file.name)
    score(champion.champion_uri, ImageSet(inbox, [], []), out, "--drift-min-batch", "2")
    runs = sorted(monitoring_runs(champion.name, out), key=lambda r: r.info.start_time)
    assert [r.data.metrics["n"] for r in runs] == [len(first), len(later)]
    assert len(pd.read_csv(out / "monitored.csv")) == len({f.name for f in image_set.files}) == len(image_set.files)


def test_dicom_inputs_are_tested_one_image_per_patient_under_a_pseudonym_of_one_run(
    champion: RegisteredDPA, tmp_path: Path
) -> None:
    """A PACS export: four patients with three radiographs each, one radiograph without PatientID and
    a PNG. scores.csv links each patient's images by a pseudonym no PatientID can be read from, and a
    second run's pseudonyms match none of the first's."""
    pacs = tmp_path / "pacs"
    blobs = [b[0].numpy() for b in blob_images(14, 32, seed=21)]
    for patient in range(4):
        (pacs / f"P{patient}").mkdir(parents=True)
        for k in range(3):
            radiograph(pacs / f"P{patient}" / f"IM{k}", blobs[3 * patient + k], "MONOCHROME2", "window", PatientID=f"MRN-00{patient}")
    radiograph(pacs / "IM-anonymous", blobs[12], "MONOCHROME2", "window")
    Image.fromarray(blobs[13]).save(pacs / "photo.png")
    output = score(champion.champion_uri, ImageSet(pacs, [], []), tmp_path / "a", "--drift-min-batch", "2")
    assert "tested one image per patient group (6 groups of 14 images); 2 images name no patient and count as their own" in output
    assert "MRN" not in (tmp_path / "a" / "scores.csv").read_text()
    first = pd.read_csv(tmp_path / "a" / "scores.csv", dtype=str, keep_default_na=False).set_index("path")["group"]
    assert first[["IM-anonymous", "photo.png"]].tolist() == ["", ""]
    patients = [set(first[[f"P{p}/IM{k}" for k in range(3)]]) for p in range(4)]
    assert all(len(names) == 1 and "" not in names for names in patients) and len(set.union(*patients)) == 4
    score(champion.champion_uri, ImageSet(pacs, [], []), tmp_path / "b", "--no-monitor")
    second = pd.read_csv(tmp_path / "b" / "scores.csv", dtype=str, keep_default_na=False)["group"]
    assert not (set(second) - {""}) & set.union(*patients)

    # A run stopped mid-batch, then resumed: one scores.csv never holds two runs' pseudonyms.
    journal = (tmp_path / "b" / JOURNAL_CSV).read_text().splitlines(keepends=True)
    (tmp_path / "b" / JOURNAL_CSV).write_text("".join(journal[:6]))
    (tmp_path / "b" / "scores.csv").unlink()
    score(champion.champion_uri, ImageSet(pacs, [], []), tmp_path / "b", "--no-monitor")
    resumed = pd.read_csv(tmp_path / "b" / "scores.csv", dtype=str, keep_default_na=False).set_index("path")["group"]
    assert all(resumed[[f"P{p}/IM{k}" for k in range(3)]].nunique() == 1 for p in range(4))
    assert not (set(resumed) - {""}) & (set(second) | set.union(*patients))
