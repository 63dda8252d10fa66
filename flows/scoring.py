"""Batch scoring (docs/serving.md): pin the registered DPA (by default the champion), score what is
new in a folder, a dataset or a DICOM directory into this run's own folder, publish a summary in the
Prefect UI, then check the batch for score drift (tasks.monitoring.monitor)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from pydantic import PositiveInt

from tasks.config import model_name_of
from tasks.monitoring.drift import DriftLevels
from tasks.monitoring.monitor import monitor_scores_task
from tasks.registry.mlflow_model import champion_uri
from tasks.serving.journal import resolve_model
from tasks.serving.run_folders import run_folder, scored_before
from tasks.serving.scoring import CHUNK, publish_scoring_summary, score_inputs_task


@flow(name="dpa-batch-scoring", log_prints=True)
def batch_scoring(
    input: str, out: str, model_uri: str | None = None, preset: str = "demo", heatmaps: bool = True,
    threshold: float | None = None, specificity: float | None = None, chunk_size: PositiveInt = CHUNK,
    monitor: bool = True, drift: DriftLevels = DriftLevels(), dicom_out: str | None = None,
) -> str:
    """Score the images under `input` (folder, dataset dir with manifest.csv, or DICOM dir) that are
    new to the model: `model_uri`, by default the champion of `preset`'s registered model, resolved
    to its version when the run starts. Writes `out/<date>_<model>-v<version>/scores.csv` and, with
    `heatmaps`, its `heatmaps/` (tasks.serving.run_folders: one folder per day and version, so a
    promotion needs no edit; files already scored by the version are skipped). Returns the CSV
    path, or "" when nothing was new.
    `threshold` (a score) or `specificity` (a quantile of the version's reference normal scores)
    replace the registered threshold, as the serving params do. `chunk_size` images are scored and
    saved together (a crash loses at most one chunk; a rerun resumes). With `monitor`, the batch's
    scores are compared with the version's reference normals (levels: `drift`), logged to the MLflow
    experiment `<model name>-monitoring`, and a drifted batch sends the Prefect event
    `dpa.scores.drifted` that triggers retraining. With `dicom_out`, each DICOM input also gets a
    Structured Report and a heat-map Secondary Capture for its study, under
    `dicom_out/<the run folder's name>/` (tasks.serving.dicom_results)."""
    model = resolve_model(model_uri or champion_uri(model_name_of(preset)))
    folder = run_folder(out, model, datetime.now(UTC).date())
    skip = scored_before(out, model, folder)
    scores_csv = score_inputs_task(model.uri, input, str(folder), heatmaps, chunk_size, threshold=threshold,
                                   specificity=specificity, skip=skip,
                                   dicom_out=str(Path(dicom_out) / folder.name) if dicom_out else None)
    if scores_csv is None:
        print(f"nothing new under {input}: its {len(skip)} file(s) were scored by {model.uri} in earlier folders of {out}")
        return ""
    for row in publish_scoring_summary(scores_csv, model.uri):
        print(f"{row['metric']}: {row['value']}")
    if monitor:
        print(monitor_scores_task(scores_csv, drift, threshold, specificity).note)
    return str(scores_csv)
