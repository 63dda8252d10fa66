"""Batch scoring (docs/serving.md): load a registered DPA (by default the champion), score a folder,
a dataset or a DICOM directory, write scores.csv and heat maps, publish a summary in the Prefect UI,
then check the batch for score drift (tasks.monitoring.monitor)."""

from __future__ import annotations

from prefect import flow
from pydantic import PositiveInt

from tasks.config import model_name_of
from tasks.monitoring.drift import DriftLevels
from tasks.monitoring.monitor import monitor_scores_task
from tasks.registry.mlflow_model import champion_uri
from tasks.serving.scoring import CHUNK, publish_scoring_summary, score_inputs_task



@flow(name="dpa-batch-scoring", log_prints=True)
def batch_scoring(
    input: str, out: str, model_uri: str | None = None, preset: str = "demo", heatmaps: bool = True,
    threshold: float | None = None, specificity: float | None = None, chunk_size: PositiveInt = CHUNK,
    monitor: bool = True, drift: DriftLevels = DriftLevels(),
) -> str:
    """Score every image under `input` (folder, dataset dir with manifest.csv, or DICOM dir) with
    `model_uri` (default: the champion of `preset`'s registered model); write `out/scores.csv` and,
    with `heatmaps`, `out/heatmaps/`. Returns the CSV path.
    `threshold` (a score) or `specificity` (a quantile of the version's reference normal scores)
    replace the registered threshold, as the serving params do. `chunk_size` images are scored and
    saved together (a crash loses at most one chunk; a rerun into `out` resumes). With `monitor`,
    the batch's scores are compared with the version's reference normals (levels: `drift`), logged
    to the MLflow experiment `<model name>-monitoring`, and a drifted batch sends the Prefect event
    `dpa.scores.drifted` that triggers retraining."""
    model_uri = model_uri or champion_uri(model_name_of(preset))
    scores_csv = score_inputs_task(model_uri, input, out, heatmaps, chunk_size, threshold=threshold, specificity=specificity)
    for row in publish_scoring_summary(scores_csv, model_uri):
        print(f"{row['metric']}: {row['value']}")
    if monitor:
        print(monitor_scores_task(scores_csv, drift, threshold, specificity).note)
    return str(scores_csv)
