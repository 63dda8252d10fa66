"""Batch scoring with a registered DPA: a folder, a dataset (manifest.csv) or a DICOM directory in,
`scores.csv` and heat-map PNGs out.

Files go through the loaded pyfunc model's own decode → check → preprocess → score path, so batch
scores equal served scores, and an image the training gate would refuse (too small, wrong channels,
blank) is refused here too. A file that cannot be read, is refused or cannot be preprocessed is never dropped: its row in
`scores.csv` has an empty score and the reason in the `error` column, the run logs it as a
warning, and the summary counts it; the other files are still scored.

scores.csv columns: `path` (relative to the input; the manifest path for a dataset),
`anomaly_score`, `is_anomaly`, `threshold` (the one `is_anomaly` applies), `label` (a manifest's),
`group` (the patient, which drift monitoring samples by: a manifest's group; for a DICOM file a
pseudonym of its PatientID that links that patient's images within one scoring run and nowhere
else; empty otherwise), `heatmap` (the PNG under
`heatmaps/`, see `tasks.registry.mlflow_model` for its grey scale), `error`, and the lineage of each row:
`model_uri` (the pinned version, `models:/<name>/<version>`), `model_version` and `input_digest`
(sha256 of the file's bytes). One row per input file, in input order.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import roc_auc_score

from data_layer.admission import ImageRefused
from data_layer.dicom import dicom_group_id
from data_layer.images import SUPPORTED_SUFFIXES, is_dicom_file, is_image_file, read_image
from data_layer.manifest import GROUP, LABEL, MANIFEST_NAME, PATH, read_manifest, resolve_path
from data_layer.pixels import ImageReadError
from tasks.registry.mlflow_model import HEATMAP, IS_ANOMALY, SCORE, DPAPyfuncModel, decode_heatmap, load_dpa_scorer
from tasks.registry.model_uri import registered_name
from tasks.runtime.interrupt import raise_if_stopping, stop_on_signal
from tasks.serving.dicom_results import DICOM_HEATMAP, DICOM_SR, NOT_DICOM, DicomOutput
from tasks.serving.journal import (
    INPUT_DIGEST,
    KEY,
    MODEL_URI,
    MODEL_VERSION,
    THRESHOLD,
    ModelRef,
    ScoreJournal,
    ScoringStateError,
    file_digests,
    output_lock,
    resolve_model,
    row_keys,
)
from tasks.training.metrics import binary_labels

SCORES_CSV, HEATMAP_DIR = "scores.csv", "heatmaps"
ERROR, FILE = "error", "file"
CHUNK = 64
"""Images decoded and scored together: bounds memory, keeps batches big enough for a GPU."""
_NOT_IMAGES = frozenset({"DICOMDIR"})

log = logging.getLogger(__name__)


class NothingScored(ValueError):
    """Every input of a scoring run was refused: a run that scored nothing must not look like a success."""


def list_inputs(input: str | Path) -> pd.DataFrame:
    """The files to score (`file`: absolute path, `path`: as reported; `label` for a manifest).

    A directory with manifest.csv is a dataset; any other directory is searched recursively for
    supported suffixes and for suffix-less DICOM files (as PACS exports write them).
    """
    root = Path(input)
    if (root / MANIFEST_NAME).is_file():
        manifest = read_manifest(root)
        files = [resolve_path(root, p) for p in manifest[PATH]]
        inputs = pd.DataFrame({FILE: files, PATH: manifest[PATH].tolist(), LABEL: manifest[LABEL].tolist(),
                               GROUP: manifest[GROUP].tolist()})
    elif root.is_file():
        inputs = pd.DataFrame({FILE: [root], PATH: [root.name]})
    elif root.is_dir():
        files = [f for f in sorted(root.rglob("*")) if f.is_file() and _is_image_file(f)]
        inputs = pd.DataFrame({FILE: files, PATH: [f.relative_to(root).as_posix() for f in files]})
    else:
        raise FileNotFoundError(
            f"{root}: no such file or directory. Give a folder of images, a dataset directory with "
            f"{MANIFEST_NAME}, or a DICOM directory."
        )
    if inputs.empty:
        raise FileNotFoundError(
            f"{root}: no image files found (suffixes {', '.join(sorted(SUPPORTED_SUFFIXES))}, "
            f"DICOM files without a suffix, or {MANIFEST_NAME} rows)."
        )
    return inputs


def patient_pseudonyms(files: list[Path]) -> list[str]:
    """Per file, a pseudonym of its DICOM PatientID ('' for other files and DICOM files without one).
    The salt is drawn for this call and never written, so a pseudonym links one patient's images
    within one scoring run and can be traced to no PatientID, nor matched across runs. A resumed run
    rewrites every row's pseudonym with its own salt, so one scores.csv never mixes two."""
    salt = secrets.token_hex(16)
    return [_pseudonym(file, salt) for file in files]


def _pseudonym(file: Path, salt: str) -> str:
    try:
        return dicom_group_id(file, salt) if is_dicom_file(file) else ""
    except (ImageReadError, OSError):  # no PatientID, unreadable or gone (its row will say why)
        return ""


def _is_image_file(file: Path) -> bool:
    return file.name not in _NOT_IMAGES and not file.name.startswith(".") and is_image_file(file)


def iter_scores(
    scorer: DPAPyfuncModel, files: list[Path], heatmaps: bool, chunk_size: int = CHUNK
) -> Iterator[pd.DataFrame]:
    """Score `files` chunk by chunk: one frame per chunk, a row per file (index = position in `files`)."""
    for start in range(0, len(files), chunk_size):
        chunk = files[start : start + chunk_size]
        yield _score_chunk(scorer, chunk, heatmaps).set_axis(range(start, start + len(chunk)))


def _score_chunk(scorer: DPAPyfuncModel, files: list[Path], heatmaps: bool) -> pd.DataFrame:
    images, errors = [], []
    for file in files:
        try:
            images.append(scorer.prepare([read_image(file)]))
            errors.append("")
        except ImageReadError as exc:
            errors.append(str(exc))
        except ImageRefused as exc:
            errors.append(f"{file}: {exc}")
        except ValueError as exc:
            errors.append(f"{file}: cannot preprocess ({exc}); check it against the model's preprocessing config")
    frame = pd.DataFrame({ERROR: errors})
    if images:
        scored = scorer.score(torch.cat(images), heatmap=heatmaps)
        frame = frame.join(scored.set_axis(frame.index[frame[ERROR] == ""]))
    return frame.reindex(columns=[SCORE, IS_ANOMALY, *([HEATMAP] if heatmaps else []), ERROR])


def score_inputs(
    model_uri: str, input: str, out: str, heatmaps: bool = True, chunk_size: int = CHUNK,
    threshold: float | None = None, specificity: float | None = None, skip: frozenset[str] = frozenset(),
    dicom_out: str | None = None,
) -> Path | None:
    """Score every image under `input` with `model_uri`; write `out/scores.csv` (+ `out/heatmaps/`).
    `threshold` or `specificity` set the operating point as the serving params do. Files whose
    `row_keys` are in `skip` (scored in an earlier run folder) are left out; None when that leaves none.
    With `dicom_out`, each DICOM input also gets a Structured Report and a heat-map Secondary Capture
    there (`tasks.serving.dicom_results`; columns `dicom_sr`, `dicom_heatmap`).

    Crash-safe and resumable (see `tasks.serving.journal`): rows reach the journal chunk by chunk, a
    rerun skips what is there, and scores.csv is written (atomically) once every file is scored.
    SIGTERM/SIGINT stop after the current chunk, with everything scored so far kept.
    """
    inputs = list_inputs(input)
    inputs[INPUT_DIGEST] = file_digests(list(inputs[FILE]))
    inputs = inputs[~row_keys(inputs).isin(skip)].reset_index(drop=True)
    if inputs.empty:
        return None
    if GROUP not in inputs:
        inputs[GROUP] = patient_pseudonyms(list(inputs[FILE]))
    model = resolve_model(model_uri)
    scorer = load_dpa_scorer(model.uri, threshold, specificity)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dicom = _dicom_output(dicom_out, model, scorer, threshold, specificity)
    columns = [PATH, SCORE, IS_ANOMALY, THRESHOLD, *([LABEL] if LABEL in inputs else []), GROUP, *([HEATMAP] if heatmaps else []),
               *([DICOM_SR, DICOM_HEATMAP] if dicom else []), ERROR, MODEL_URI, MODEL_VERSION, INPUT_DIGEST]
    with output_lock(out_dir), stop_on_signal():
        journal = ScoreJournal(out_dir, columns, model, repr(scorer.threshold), optional=frozenset({GROUP}))
        done = journal.read()
        columns = journal.columns
        _refuse_foreign_scores(out_dir / SCORES_CSV, model)
        todo = inputs[~row_keys(inputs).isin(set(row_keys(done)))].reset_index(drop=True)
        if len(todo) < len(inputs):
            print(f"resuming {out_dir}: {len(inputs) - len(todo)} of {len(inputs)} files already scored by version {model.version}")
        fresh = _score_todo(model, scorer, todo, _Outputs(out_dir, heatmaps, dicom), journal, chunk_size)
        results = _in_input_order(inputs, pd.concat([done, fresh.astype(str)], ignore_index=True), columns)
        if GROUP in columns:  # this run's groups: journaled rows may hold an earlier run's pseudonyms
            results[GROUP] = inputs[GROUP].to_numpy()
        csv = out_dir / SCORES_CSV
        _write_atomically(results, csv)
    failed = results.loc[results[ERROR] != "", [PATH, ERROR]]
    for path, error in failed.itertuples(index=False):
        log.warning("not scored: %s: %s", path, error)
    if len(failed) == len(results):
        reasons = "; ".join(f"{path}: {error}" for path, error in failed.head(3).itertuples(index=False))
        raise NothingScored(
            f"none of the {len(results)} input file(s) under {input} could be scored (each row of {csv} names its "
            f"reason; first: {reasons}). Check that they are images of the model's kind, then score them again."
        )
    return csv



@dataclass(frozen=True)
class _Outputs:
    """What a scoring run writes besides scores.csv: heat-map PNGs, DICOM results."""

    out_dir: Path
    heatmaps: bool
    dicom: DicomOutput | None

    @property
    def needs_maps(self) -> bool:
        return self.heatmaps or self.dicom is not None


def _dicom_output(
    dicom_out: str | None, model: ModelRef, scorer: DPAPyfuncModel, threshold: float | None, specificity: float | None
) -> DicomOutput | None:
    """The specificity a report states: the one asked for, else the registered threshold's quantile of
    the reference normals; none for a threshold given as a score."""
    if dicom_out is None:
        return None
    if specificity is None and threshold is None and scorer.reference is not None:
        specificity = scorer.reference.quantile
    return DicomOutput(Path(dicom_out), registered_name(model.uri) or "dpa", model.version, model.uri, scorer.threshold,
                       specificity, scorer.config.preprocess)


def _score_todo(
    model: ModelRef, scorer: DPAPyfuncModel, todo: pd.DataFrame, outputs: _Outputs, journal: ScoreJournal, chunk_size: int
) -> pd.DataFrame:
    """Score the files not yet in the journal, appending each chunk durably before the next;
    unreadable files (no digest) are not journaled: they are cheap to report again."""
    if todo.empty:
        return pd.DataFrame(columns=journal.columns)
    frames = []
    for frame in iter_scores(scorer, list(todo[FILE]), outputs.needs_maps, chunk_size):
        if outputs.dicom is not None:
            frame[DICOM_SR], frame[DICOM_HEATMAP] = _write_dicom(outputs.dicom, todo, frame)
        if outputs.heatmaps:
            frame[HEATMAP] = [_write_heatmap(outputs.out_dir, todo.at[i, PATH], cell) for i, cell in frame[HEATMAP].items()]
        rows = pd.concat([todo.loc[frame.index].drop(columns=FILE), frame], axis=1)
        rows[THRESHOLD], rows[MODEL_URI], rows[MODEL_VERSION] = journal.threshold, model.uri, model.version
        rows[SCORE] = rows[SCORE].map(lambda v: "" if pd.isna(v) else repr(float(v)))
        rows[IS_ANOMALY] = rows[IS_ANOMALY].map(lambda v: "" if pd.isna(v) else str(bool(v)))
        journal.append(rows[rows[INPUT_DIGEST] != ""])
        frames.append(rows)
        raise_if_stopping()
    return pd.concat(frames, ignore_index=True)[journal.columns]


def _write_dicom(dicom: DicomOutput, todo: pd.DataFrame, frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    written = [
        dicom.write(todo.at[i, FILE], todo.at[i, PATH], float(frame.at[i, SCORE]), bool(frame.at[i, IS_ANOMALY]),
                    decode_heatmap(frame.at[i, HEATMAP])) if frame.at[i, ERROR] == "" else ("", "")
        for i in frame.index
    ]
    return [sr for sr, _ in written], [capture for _, capture in written]


def _in_input_order(inputs: pd.DataFrame, rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Exactly one row per input file, in the order of `list_inputs` (the latest row of a key wins)."""
    rows = rows.drop_duplicates(list(KEY), keep="last").set_index(list(KEY))
    keys = pd.MultiIndex.from_frame(inputs[list(KEY)].astype(str))
    return rows.reindex(keys).reset_index()[columns]


def _refuse_foreign_scores(csv: Path, model: ModelRef) -> None:
    """A scores.csv of another model version (or of an older scorer that did not record one) is
    never overwritten by or merged with this run's."""
    if not csv.is_file():
        return
    versions = set(pd.read_csv(csv, dtype=str, keep_default_na=False).get(MODEL_VERSION, pd.Series(["unknown"])))
    if versions - {model.version}:
        raise ScoringStateError(
            f"{csv} holds scores of model version {', '.join(sorted(versions - {model.version}))}, not {model.version} "
            f"({model.uri}); choose another --out, or delete that folder to score it again."
        )


def _write_atomically(results: pd.DataFrame, csv: Path) -> None:
    tmp = csv.with_suffix(".csv.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        results.to_csv(handle, index=False, lineterminator="\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, csv)


def _write_heatmap(out_dir: Path, path: str, cell: object) -> str:
    """Write one heat map (tmp file + rename), mirroring the input's layout; '' for an unscored row."""
    if not isinstance(cell, str):
        return ""
    rel = Path(HEATMAP_DIR) / f"{path}.heatmap.png"
    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(base64.b64decode(cell))
    os.replace(tmp, target)
    return rel.as_posix()


def summarize(scores_csv: Path) -> list[dict[str, str]]:
    """Metric/value rows of a scores.csv: counts, score range, and AUROC when labels allow it."""
    results = pd.read_csv(scores_csv, keep_default_na=False, dtype={ERROR: str, LABEL: str, DICOM_SR: str})
    scored = results[results[ERROR] == ""]
    scores = scored[SCORE].astype(float)
    rows = {
        "images": len(results),
        "scored": len(scored),
        "not scored (see error column)": len(results) - len(scored),
        "flagged anomalous": int((scored[IS_ANOMALY].astype(str) == "True").sum()),
    }
    if len(scores):
        rows["score median [min, max]"] = f"{scores.median():.4g} [{scores.min():.4g}, {scores.max():.4g}]"
    if DICOM_SR in results:
        rows["DICOM reports + heat-map images written"] = int(results[DICOM_SR].str.endswith(".dcm").sum())
        rows["not DICOM (no DICOM written)"] = int((results[DICOM_SR] == NOT_DICOM).sum())
    if LABEL in scored and scored[LABEL].nunique() == 2:
        rows["AUROC (manifest labels)"] = f"{roc_auc_score(binary_labels(scored[LABEL]), scores):.4f}"
    return [{"metric": key, "value": str(value)} for key, value in rows.items()]


@task(name="score-images", cache_policy=NO_CACHE)
def score_inputs_task(
    model_uri: str, input: str, out: str, heatmaps: bool = True, chunk_size: int = CHUNK,
    threshold: float | None = None, specificity: float | None = None, skip: frozenset[str] = frozenset(),
    dicom_out: str | None = None,
) -> Path | None:
    return score_inputs(model_uri, input, out, heatmaps, chunk_size, threshold=threshold, specificity=specificity, skip=skip,
                        dicom_out=dicom_out)


@task(name="publish-scoring-summary", cache_policy=NO_CACHE)
def publish_scoring_summary(scores_csv: Path, model_uri: str) -> list[dict[str, str]]:
    """The summary as a Prefect table artifact: what a person checks first after a batch."""
    rows = summarize(scores_csv)
    create_table_artifact(rows, key="batch-scoring-summary", description=f"{model_uri} → {scores_csv}")
    return rows
