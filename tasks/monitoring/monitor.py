"""Score-drift monitoring of a scored batch: compare (`tasks.monitoring.drift`), record (MLflow), tell Prefect.

Every monitored batch is one MLflow run in the experiment `<model name>-monitoring`, tagged with the
model version, its URI and the batch's input digest (sha256 over the sorted per-file digests of
scores.csv: the same files give the same digest whatever their names or order); the statistics are
its metrics, the full report its `drift_report.json`. A drifted batch also sends the Prefect event
`dpa.scores.drifted` (resource `dpa.model.<name>`, label `dpa.model.version`, payload: the report,
the version, the digest and the MLflow run), which the retraining deployment in prefect.yaml
triggers on, with a cooldown (docs/deployments.md).

A batch is what a scoring run scored that no earlier monitoring of the same output folder covered:
`monitored.csv` beside scores.csv lists the input digests already monitored, so an inbox that
grows day by day is tested on each day's new images, and re-running a finished batch adds nothing.
The same images monitored again for the same version (the ledger lost, another folder) find the
existing run by its input digest: no second run, no second event. Where scores.csv names the
patient in its `group` column (a scored dataset's manifest; for DICOM inputs a pseudonym of
PatientID, see `tasks.serving.scoring`), the tests take one image per patient
(`tasks.monitoring.drift.one_per_group`); an image without one (a PNG folder, a DICOM file without
PatientID) counts as its own patient, and the note says how many did: several images of one
patient tested as independent make drift look stronger.

Outside a flow run the event is sent only when a Prefect server is configured (PREFECT_API_URL):
without one there is nobody to tell, and starting a temporary server for one event would only
slow `dpa score` down. A version without stored reference scores (logged before thresholds at
inference) or a model outside the registry cannot be monitored: that is said in a warning and the
batch is left unmonitored; scoring itself is not affected.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel

from data_layer.manifest import GROUP
from tasks.monitoring.drift import DriftLevels, DriftReport, drift_report, one_per_group
from tasks.registry.mlflow_model import SCORE, LegacyModelError, ReferenceScores, load_reference_scores
from tasks.registry.model_uri import registered_name
from tasks.registry.tracking import ensure_experiment
from tasks.serving.journal import INPUT_DIGEST, MODEL_URI, MODEL_VERSION
from tasks.serving.scoring import ERROR
from tasks.training.metrics import VAL_NORMALS

MONITORING_SUFFIX = "-monitoring"
DRIFT_EVENT = "dpa.scores.drifted"
REPORT_FILE = "drift_report.json"
LEDGER = "monitored.csv"
"""Beside scores.csv: the input digests already monitored, and the monitoring run that covered each."""
ARTIFACT_KEY = "score-drift"

log = logging.getLogger(__name__)


class Unmonitorable(ValueError):
    """A scores.csv whose batch cannot be compared with a registered version's reference."""


class Batch(BaseModel):
    """What monitoring needs from a scores.csv: the scores and which version made them."""

    scores_csv: str
    scores: list[float]
    model_uri: str
    model_name: str
    model_version: str
    input_digest: str
    digests: list[str] = []
    """The per-file digests of the batch's rows (those scored and those that failed)."""
    n_images: int = 0
    """Scored images; `scores` holds one per patient where the batch names them."""
    grouped: bool = False
    ungrouped: int = 0
    """Of a grouped batch, the scored images that name no patient: each tested as its own (0 when none names one)."""

    def sampling_note(self) -> str:
        if not self.grouped:
            return "the inputs carry no patient group: images tested as independent (a patient's several images overstate drift)"
        note = f"tested one image per patient group ({len(self.scores)} groups of {self.n_images} images)"
        if self.ungrouped:
            note += f"; {self.ungrouped} images name no patient and count as their own"
        if len(self.scores) == 1 and self.n_images > 1:
            note += "; every image names the same patient: a placeholder PatientID? (then give each its own, or a manifest)"
        return note


class Monitoring(BaseModel):
    """The outcome for one batch: `note` says it in one line (the verdict, or why it was skipped)."""

    note: str
    report: DriftReport | None = None
    run_id: str | None = None
    event_id: str | None = None


def read_batch(scores_csv: str | Path, monitored: frozenset[str] = frozenset()) -> Batch:
    """The batch in a scores.csv: its rows whose input digest is not in `monitored` (`Unmonitorable`
    says why there is none)."""
    frame = pd.read_csv(scores_csv, dtype=str, keep_default_na=False)
    uris = sorted(set(frame.get(MODEL_URI, pd.Series(dtype=str))) - {""})
    if len(uris) != 1 or MODEL_VERSION not in frame:
        raise Unmonitorable(f"{scores_csv} names {len(uris)} model URIs; monitoring needs the one model version that scored it")
    name = registered_name(uris[0])
    if name is None:
        raise Unmonitorable(f"{uris[0]} is not a registered model version (models:/name/N): monitoring runs are kept per registered model")
    version = frame[MODEL_VERSION].iloc[0]
    frame = frame[~frame[INPUT_DIGEST].isin(monitored)] if INPUT_DIGEST in frame else frame
    scored = frame[frame[ERROR] == ""]
    scores = scored[SCORE].astype(float).to_numpy()
    named = scored.get(GROUP, pd.Series("", index=scored.index)).to_numpy(dtype=str)
    unnamed = int((named == "").sum())
    grouped = unnamed < len(named)
    digests = sorted(d for d in frame.get(INPUT_DIGEST, []) if d)
    return Batch(
        scores_csv=str(Path(scores_csv).resolve()), scores=one_per_group(scores, _patients(named)).tolist(),
        model_uri=uris[0], model_name=name, model_version=version,
        input_digest=hashlib.sha256("\n".join(digests).encode()).hexdigest(), digests=digests, n_images=len(scores),
        grouped=grouped, ungrouped=unnamed if grouped else 0,
    )


def _patients(groups: np.ndarray) -> np.ndarray:
    """Each image's patient: its group, or the image itself where it names none (a key no group can be)."""
    return np.where(groups != "", groups, np.char.add("\0image ", np.arange(len(groups)).astype(str)))


def operating_threshold(reference: ReferenceScores, threshold: float | None, specificity: float | None) -> float:
    """The threshold the batch was scored with: given, at a given specificity, or the registered one
    (the reference's own quantile), as `DPAPyfuncModel.operating_threshold` chooses it."""
    if threshold is not None:
        return float(threshold)
    return reference.threshold_at(reference.quantile if specificity is None else specificity)


def monitor_batch(
    scores_csv: str | Path, levels: DriftLevels | None = None, threshold: float | None = None, specificity: float | None = None,
) -> Monitoring:
    """Compare the batch in `scores_csv` with its version's reference normals, log the MLflow
    monitoring run and, when it drifted, send the Prefect event. `threshold`/`specificity` are
    those the batch was scored with."""
    monitored = read_ledger(scores_csv)
    try:
        batch = read_batch(scores_csv, frozenset(monitored))
        if not batch.digests:
            return Monitoring(note=f"score drift: nothing new to monitor in {scores_csv} ({len(monitored)} images "
                                   "monitored before; a monitoring run covers the images scored since the last one)")
        reference = load_reference_scores(batch.model_uri)
    except (Unmonitorable, LegacyModelError) as exc:
        return _skipped(str(exc))
    earlier = existing_run(batch)
    if earlier is not None:
        append_ledger(scores_csv, batch.digests, earlier)
        return Monitoring(note=f"score drift: these {len(batch.digests)} images were monitored for version "
                               f"{batch.model_version} already (MLflow run {earlier}); no new run, no new event", run_id=earlier)
    report = drift_report(batch.scores, reference.scores, operating_threshold(reference, threshold, specificity), levels)
    run_id = log_monitoring_run(batch, report, reference)
    append_ledger(scores_csv, batch.digests, run_id)
    event_id = emit_drift_event(batch, report, run_id) if report.drifted else None
    if event_id:
        MlflowClient().set_tag(run_id, "prefect_event_id", event_id)
    note = f"{report.summary()}; {batch.sampling_note()}"
    if reference.source != VAL_NORMALS:
        note += f"; CAUTION: the reference is {reference.source}, which the model has seen: new normals score higher, so drift is over-reported"
        log.warning(note)
    return Monitoring(note=note, report=report, run_id=run_id, event_id=event_id)


def read_ledger(scores_csv: str | Path) -> set[str]:
    """The input digests of this output folder that a monitoring run already covered."""
    ledger = Path(scores_csv).with_name(LEDGER)
    return set(pd.read_csv(ledger, dtype=str)[INPUT_DIGEST]) if ledger.is_file() else set()


def append_ledger(scores_csv: str | Path, digests: list[str], run_id: str) -> None:
    ledger = Path(scores_csv).with_name(LEDGER)
    rows = pd.DataFrame({INPUT_DIGEST: digests, "monitoring_run_id": run_id})
    rows.to_csv(ledger, mode="a", header=not ledger.is_file(), index=False)


def existing_run(batch: Batch) -> str | None:
    """The monitoring run of the same images and version, if one exists (idempotent per input digest)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(batch.model_name + MONITORING_SUFFIX)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], max_results=1,
        filter_string=f"tags.input_digest = '{batch.input_digest}' and tags.model_version = '{batch.model_version}'",
    )
    return runs[0].info.run_id if runs else None


def _skipped(reason: str) -> Monitoring:
    note = f"score-drift monitoring SKIPPED: {reason}"
    log.warning(note)
    return Monitoring(note=note)


def log_monitoring_run(batch: Batch, report: DriftReport, reference: ReferenceScores) -> str:
    """One finished run in `<model name>-monitoring`; its id."""
    client = MlflowClient()
    experiment = ensure_experiment(batch.model_name + MONITORING_SUFFIX)
    tags = {
        "model_name": batch.model_name, "model_version": batch.model_version, "model_uri": batch.model_uri,
        "input_digest": batch.input_digest, "scores_csv": batch.scores_csv, "drift_verdict": report.verdict,
        "drifted": str(report.drifted), "sampling": batch.sampling_note(),
        **({"prefect_flow_run_id": flow_run.get_id()} if flow_run.get_id() else {}),
    }
    run = client.create_run(experiment, run_name=f"v{batch.model_version} {report.verdict} ({report.n} images)", tags=tags)
    now = mlflow.utils.time.get_current_time_millis()
    numbers = report.model_dump(include={"n", "n_reference", "threshold", "expected_above", "observed_above",
                                         "ks_statistic", "ks_pvalue", "exceedance_pvalue"})
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in numbers.items() if value is not None]
        + [Metric("drifted", float(report.drifted), now, 0)],
        params=[Param("drift_alpha", str(report.alpha)), Param("drift_min_batch", str(report.min_batch)),
                Param("reference_source", reference.source), Param("threshold_rule", reference.rule)],
    )
    client.log_text(run.info.run_id, report.model_dump_json(indent=2), REPORT_FILE)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def emit_drift_event(batch: Batch, report: DriftReport, run_id: str) -> str | None:
    """Send `dpa.scores.drifted` for this version; its id, or None when there is no Prefect API to send it to."""
    if FlowRunContext.get() is None and PREFECT_API_URL.value() is None:
        log.warning("%s not sent: no Prefect server configured (PREFECT_API_URL), so no retraining trigger can see it", DRIFT_EVENT)
        return None
    event = emit_event(
        DRIFT_EVENT,
        resource={"prefect.resource.id": f"dpa.model.{batch.model_name}", "prefect.resource.name": batch.model_name,
                  "dpa.model.version": batch.model_version},
        related=[{"prefect.resource.id": f"mlflow.run.{run_id}", "prefect.resource.role": "monitoring-run"}],
        payload={**report.model_dump(), "model_uri": batch.model_uri, "input_digest": batch.input_digest,
                 "monitoring_run_id": run_id},
    )
    return str(event.id) if event else None


def report_markdown(scores_csv: str | Path, result: Monitoring) -> str:
    """The artifact a person reads in the Prefect UI."""
    lines = [f"## Score drift of `{scores_csv}`", "", result.note, ""]
    if result.report is not None:
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in result.report.model_dump().items()]
        lines += ["", f"MLflow monitoring run: `{result.run_id}`"]
        if result.event_id:
            lines.append(f"Prefect event `{DRIFT_EVENT}`: `{result.event_id}`")
    return "\n".join(lines)


@task(name="monitor-score-drift", cache_policy=NO_CACHE)
def monitor_scores_task(
    scores_csv: Path, levels: DriftLevels, threshold: float | None = None, specificity: float | None = None,
) -> Monitoring:
    """`monitor_batch`, published as the `score-drift` markdown artifact."""
    result = monitor_batch(scores_csv, levels, threshold, specificity)
    create_markdown_artifact(report_markdown(scores_csv, result), key=ARTIFACT_KEY, description=result.note)
    return result
