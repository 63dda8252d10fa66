"""The data the search may see: a train/val view of the dataset, its folds and validation anomalies.

The search only ever sees a *train/val view* of the dataset: a dataset directory whose manifest
lacks the test rows and whose test files are not linked, built before anything is decoded. On it,
folds are K group-disjoint folds of the normal `train` images (no patient in two folds); a fold
trains on the other folds' normals and validates on its own. The validation anomalies are at most
`n` abnormal train/val images of one chosen type; every fold validates against all of them:
anomalies never enter training, so sharing them leaks nothing, and with a few dozen anomalies a
per-fold share would make each fold's AUROC mostly noise.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import GroupKFold

from data_layer.manifest import (
    ABNORMAL,
    ANOMALY_TYPE,
    GROUP,
    LABEL,
    MANIFEST_NAME,
    NORMAL,
    PATH,
    SPLIT,
    read_manifest,
    resolve_path,
    staged_dataset,
    write_manifest,
)
from data_layer.preprocessing import PreprocessConfig, PreprocessedDataset, preprocess_dataset

TUNING_SPLITS = ("train", "val")
"""The only splits the search may touch; the test split is for the final model alone."""


def trainval_view(dataset_dir: Path, out_dir: Path) -> Path:
    """A dataset directory with only the train/val rows, its files linked to the originals.

    Everything the search decodes comes from here, so no step of it can read a test image: the
    test rows are not in the manifest and the test files are not in the directory. The view of a
    data version never changes, so an existing one is reused.
    """
    if (out_dir / MANIFEST_NAME).is_file():
        return out_dir
    manifest = read_manifest(dataset_dir)
    keep = manifest[manifest[SPLIT].isin(TUNING_SPLITS)]
    with staged_dataset(out_dir, overwrite=True) as stage:
        for rel in keep[PATH]:
            link = resolve_path(stage, rel)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(resolve_path(dataset_dir, rel).resolve())
        write_manifest(keep, stage)
    return out_dir


build_trainval_view = task(name="tuning-trainval-view", cache_policy=NO_CACHE)(trainval_view)


@dataclass(frozen=True)
class Fold:
    """Row positions (into the train/val view) of one fold's training and validation normals."""

    train_rows: tuple[int, ...]
    val_rows: tuple[int, ...]


@dataclass(frozen=True)
class CVPlan:
    folds: tuple[Fold, ...]
    anomaly_rows: tuple[int, ...]
    """The validation anomalies, shared by every fold."""


def make_folds(manifest: pd.DataFrame, n_folds: int, seed: int = 0) -> tuple[Fold, ...]:
    """K folds over the normal `train` images, grouped by `group` so no patient is in two folds."""
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    normals = np.flatnonzero(((manifest[SPLIT] == "train") & (manifest[LABEL] == NORMAL)).to_numpy())
    groups = manifest[GROUP].to_numpy()[normals]
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patient groups of normal train images; found {n_groups}")
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return tuple(
        Fold(tuple(int(i) for i in normals[train]), tuple(int(i) for i in normals[val]))
        for train, val in splitter.split(normals, groups=groups)
    )


def select_validation_anomalies(manifest: pd.DataFrame, anomaly_type: str, n: int, seed: int = 0) -> tuple[int, ...]:
    """At most `n` abnormal train/val images of `anomaly_type` (a seeded sample), never test ones."""
    abnormal = (manifest[LABEL] == ABNORMAL) & manifest[SPLIT].isin(TUNING_SPLITS)
    rows = np.flatnonzero((abnormal & (manifest[ANOMALY_TYPE] == anomaly_type)).to_numpy())
    if len(rows) == 0:
        available = sorted(set(manifest.loc[abnormal, ANOMALY_TYPE]) - {""})
        raise ValueError(
            f"no abnormal train/val images of anomaly type {anomaly_type!r}; available types: {available or 'none'}"
        )
    if len(rows) < n:
        warnings.warn(f"only {len(rows)} validation anomalies of type {anomaly_type!r} (asked for {n}); using all", stacklevel=2)
    chosen = np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False)
    return tuple(int(i) for i in np.sort(chosen))


def plan_cross_validation(manifest: pd.DataFrame, n_folds: int, anomaly_type: str, n_anomalies: int, seed: int = 0) -> CVPlan:
    return CVPlan(make_folds(manifest, n_folds, seed), select_validation_anomalies(manifest, anomaly_type, n_anomalies, seed))


@dataclass(frozen=True)
class SearchData:
    """Where a trial finds the decoded train/val view: its preprocessing cache. A reference, not
    tensors, so a process or cluster worker loads the cache (shared file system) instead of
    receiving a pickled copy of the dataset with every trial."""

    view_dir: Path
    preprocess: PreprocessConfig
    cache_dir: Path
    data_version: str

    def load(self) -> PreprocessedDataset:
        return _load_view(self)


@functools.lru_cache(maxsize=1)
def _load_view(data: SearchData) -> PreprocessedDataset:
    """One copy per worker process, shared by the trials it runs."""
    return preprocess_dataset(data.view_dir, data.preprocess, data.cache_dir, data.data_version)
