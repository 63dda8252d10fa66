"""The dataset contract (docs/architecture.md, "Dataset on disk"): a directory holding `manifest.csv` plus image files.

Columns: `path` (relative, inside the dataset dir), `label` (normal | abnormal), `split`
(train | val | test), `group` (patient or slide id; a group never spans two splits) and
`anomaly_type` (optional free text, empty for normal images).

Reading here is structural only (columns present, paths that stay inside the dataset): the deep
checks (domains, nulls, duplicates, leakage, image content) are the Great Expectations gate's job,
and it imports the constants below so both sides agree on one contract.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

MANIFEST_NAME = "manifest.csv"
PATH, LABEL, SPLIT, GROUP, ANOMALY_TYPE = "path", "label", "split", "group", "anomaly_type"
COLUMNS = (PATH, LABEL, SPLIT, GROUP, ANOMALY_TYPE)
REQUIRED_COLUMNS = (PATH, LABEL, SPLIT, GROUP)
NORMAL, ABNORMAL = "normal", "abnormal"
LABELS = (NORMAL, ABNORMAL)
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest breaks the contract; the message names the file, the row and the fix."""


def read_manifest(dataset_dir: str | Path) -> pd.DataFrame:
    """Load `manifest.csv` as strings (empty anomaly_type stays ""), checking columns and paths."""
    file = Path(dataset_dir) / MANIFEST_NAME
    if not file.is_file():
        raise ManifestError(f"{file}: not found. Create it with an importer (dpa data import ...).")
    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not a readable CSV ({exc}). Re-create it.") from exc
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        raise ManifestError(
            f"{file}: missing column(s) {missing}; the header must be {','.join(COLUMNS)}."
        )
    if ANOMALY_TYPE not in df.columns:
        df[ANOMALY_TYPE] = ""
    _check_paths(df[PATH], file)
    return df


def write_manifest(df: pd.DataFrame, dataset_dir: str | Path) -> Path:
    """Write the contract columns in a fixed order, rows sorted by path: same rows, same bytes."""
    file = Path(dataset_dir) / MANIFEST_NAME
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        raise ManifestError(f"cannot write {file}: missing column(s) {missing}")
    out = df.reindex(columns=list(COLUMNS)).fillna("").astype(str)
    _check_paths(out[PATH], file)
    out = out.sort_values(list(COLUMNS), kind="mergesort")
    file.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(file, index=False, lineterminator="\n", encoding="utf-8")
    return file


@contextmanager
def staged_dataset(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling directory to build a dataset in; move it to `out_dir` only when the
    block succeeds. A failed import never leaves a half-written dataset, nor loses the old one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty: choose a new directory or pass overwrite=True."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    stage.chmod(0o755)
    retired = out_dir.with_name(f".{out_dir.name}.retired-{stage.name.rsplit('-', 1)[-1]}")
    if out_dir.exists():
        os.replace(out_dir, retired)
    os.replace(stage, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def resolve_path(dataset_dir: str | Path, rel: str) -> Path:
    """Join a manifest path onto the dataset dir, refusing any path that would leave it."""
    problem = path_problem(rel)
    if problem:
        raise ManifestError(f"path {rel!r} {problem}")
    return Path(dataset_dir) / PurePosixPath(rel)


def path_problem(rel: str) -> str | None:
    """Why `rel` is not a safe manifest path, or None. Lexical on purpose: no symlink resolution,
    so a DVC checkout that links files into its cache still passes."""
    if not rel or not rel.strip():
        return "is empty"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor:
        return "is absolute; paths must be relative to the dataset directory"
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        return "contains '..' and would escape the dataset directory"
    return None


def select(
    df: pd.DataFrame,
    split: str | None = None,
    label: str | None = None,
    anomaly_types: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows matching every given filter. The original index is kept, so callers can use it to
    pick the matching rows of arrays aligned with `df` (see PreprocessedDataset.subset)."""
    return df[selection_mask(df, split, label, anomaly_types)]


def selection_mask(
    df: pd.DataFrame,
    split: str | None = None,
    label: str | None = None,
    anomaly_types: str | Iterable[str] | None = None,
) -> np.ndarray:
    """Boolean mask behind `select`; unknown split/label values raise instead of matching nothing."""
    _check_domain(SPLIT, split, SPLITS)
    _check_domain(LABEL, label, LABELS)
    mask = np.ones(len(df), dtype=bool)
    if split is not None:
        mask &= (df[SPLIT] == split).to_numpy()
    if label is not None:
        mask &= (df[LABEL] == label).to_numpy()
    if anomaly_types is not None:
        wanted = [anomaly_types] if isinstance(anomaly_types, str) else list(anomaly_types)
        mask &= df[ANOMALY_TYPE].isin(wanted).to_numpy()
    return mask


def salted_group_id(value: str, salt: str) -> str:
    """Short salted sha256 of a patient identifier: groups stay linkable, the identifier does not
    leave the machine (a salt kept out of git stops dictionary attacks on small id spaces)."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


def _check_paths(paths: pd.Series, file: Path) -> None:
    for position, rel in enumerate(paths):
        problem = path_problem(rel)
        if problem:
            raise ManifestError(
                f"{file} line {position + 2}: path {rel!r} {problem}. Use a path relative to "
                f"{file.parent} without '..', e.g. images/<name>.png, and move the file there."
            )


def _check_domain(column: str, value: str | None, domain: tuple[str, ...]) -> None:
    if value is not None and value not in domain:
        raise ValueError(f"{column} must be one of {domain}, got {value!r}")
