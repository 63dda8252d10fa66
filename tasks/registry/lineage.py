"""Lineage records: which data trained a run, logged as an MLflow dataset input.

The dataset input's digest is the DVC hash of data/ (the run's data version), its source the DVC
remote that holds that version, and its rows the manifest's counts per split and label, so the
MLflow UI shows, for every model, the data it was trained and tested on and where to get them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from dvc.config import Config
from mlflow import MlflowClient

from data_layer.manifest import LABEL, SPLIT, read_manifest
from tasks.registry.model_uri import registered_name, registered_version
from tasks.serving.dicom_results import model_uri_of_report

DATASET_NAME = "data"
DATASET_CONTEXT = "training"
COUNTS_TAG = "data_counts"


def manifest_counts(dataset_dir: str | Path) -> pd.DataFrame:
    """One row per (split, label) with its image count, in a stable order."""
    manifest = read_manifest(dataset_dir)
    counts = manifest.groupby([SPLIT, LABEL]).size().rename("images").reset_index()
    return counts.sort_values([SPLIT, LABEL], ignore_index=True)


def dvc_remote_url(project: str | Path) -> str:
    """The URL of the project's default DVC remote (local paths made absolute), or '' when none."""
    dvc_dir = Path(project) / ".dvc"
    if not dvc_dir.is_dir():
        return ""
    config = Config(dvc_dir=str(dvc_dir))
    name = config["core"].get("remote")
    url = config["remote"].get(name, {}).get("url", "") if name else ""
    if url and "://" not in url:
        url = str((dvc_dir / url).resolve())
    return url


def log_dataset_input(dataset_dir: str | Path, data_version: str, project: str | Path) -> mlflow.data.Dataset:
    """`mlflow.log_input` of the run's dataset into the active run; returns what was logged."""
    source = dvc_remote_url(project) or str(Path(dataset_dir).resolve())
    dataset = mlflow.data.from_pandas(manifest_counts(dataset_dir), source=source, name=DATASET_NAME, digest=data_version)
    mlflow.log_input(dataset, context=DATASET_CONTEXT)
    counts = manifest_counts(dataset_dir)
    mlflow.set_tag(COUNTS_TAG, ", ".join(f"{r.split}/{r.label}={r.images}" for r in counts.itertuples()))
    return dataset


def lineage(target: str, client: MlflowClient | None = None) -> list[str]:
    """The chain behind `target` (a scores.csv, a DPA DICOM report, `models:/name@alias`,
    `models:/name/version` or a run id), one line per link: scores → model version → run → git commit → data version →
    manifest counts → import source. A missing link is said as such, never skipped."""
    client = client or MlflowClient()
    lines: list[str] = []
    if target.endswith(".csv"):
        target = _model_of_scores(Path(target), lines)
        if target is None:
            return lines
    elif target.endswith(".dcm"):
        uri = model_uri_of_report(Path(target))
        lines.append(f"DICOM report: {target}")
        if uri is None:
            return [*lines, "MISSING: the file names no model (not a DPA anomaly report)"]
        target = uri
    if target.startswith("models:/"):
        version = registered_version(target, client)
        lines.append(f"model version: {version.name} v{version.version} (aliases {', '.join(version.aliases) or 'none'})")
        if not version.run_id:
            return [*lines, "MISSING: the model version has no MLflow run; no further lineage"]
        target = version.run_id
    run = client.get_run(target)
    tags = run.data.tags
    lines.append(f"run: {run.info.run_id} ({run.info.run_name}, experiment {run.info.experiment_id})")
    lines.append(f"git commit: {tags.get('git_commit') or 'MISSING: the run has no git_commit tag'}")
    lines.append(f"data version: {tags.get('data_version') or 'MISSING: the run has no data_version tag'}")
    lines += _dataset_lines(run.inputs.dataset_inputs if run.inputs else [], tags)
    return lines


def _model_of_scores(scores_csv: Path, lines: list[str]) -> str | None:
    frame = pd.read_csv(scores_csv, dtype=str, keep_default_na=False)
    lines.append(f"scores: {scores_csv} ({len(frame)} rows)")
    if "model_uri" not in frame.columns:
        lines.append("MISSING: scores.csv has no model_uri column (written before per-row lineage); rescore to record it")
        return None
    uris = sorted(set(frame["model_uri"]) - {""})
    if len(uris) != 1:
        lines.append(f"MISSING: scores.csv names {len(uris)} model URIs ({', '.join(uris) or 'none'}); expected one")
        return None
    if "model_version" in frame.columns and frame["model_version"].nunique() == 1:
        name = registered_name(uris[0])  # by version: the alias may have moved since
        return f"models:/{name}/{frame['model_version'].iloc[0]}"
    return uris[0]


def _dataset_lines(inputs: list, tags: dict[str, str]) -> list[str]:
    datasets = [i.dataset for i in inputs if i.dataset.name == DATASET_NAME]
    if not datasets:
        return ["MISSING: the run logged no dataset input (trained before lineage was recorded)"]
    dataset = datasets[-1]
    source = json.loads(dataset.source).get("uri", dataset.source)
    gone = "://" not in source and not Path(source).exists()
    return [
        f"dataset input: digest {dataset.digest}",
        f"manifest counts: {tags.get(COUNTS_TAG) or 'MISSING: the run has no ' + COUNTS_TAG + ' tag'}",
        f"import source: {source}" + (" — MISSING: no longer there; this data version cannot be pulled from it" if gone else ""),
    ]
