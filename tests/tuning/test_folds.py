"""What the search may see: group-disjoint folds, validation anomalies, the train/val view."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from data_layer.manifest import read_manifest
from data_layer.phantoms import PhantomSpec, generate_phantoms
from tasks.tuning.data import make_folds, select_validation_anomalies, trainval_view


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = PhantomSpec(n_train_normal=60, n_val_normal=12, n_test_normal=12, n_val_abnormal=30, n_test_abnormal=30, size=16)
    return generate_phantoms(tmp_path_factory.mktemp("phantoms") / "data", spec)


@pytest.fixture(scope="module")
def manifest(phantoms: Path) -> pd.DataFrame:
    return read_manifest(phantoms)


@pytest.mark.parametrize("n_folds", [2, 3])
def test_folds_partition_normal_train_images_by_patient(manifest: pd.DataFrame, n_folds: int) -> None:
    folds = make_folds(manifest, n_folds, seed=1)
    normal_train = set(manifest.index[(manifest.split == "train") & (manifest.label == "normal")])
    assert len(folds) == n_folds
    val_sets = [set(fold.val_rows) for fold in folds]
    assert set().union(*val_sets) == normal_train  # every normal train image validates exactly once
    assert sum(map(len, val_sets)) == len(normal_train)
    for fold in folds:
        assert set(fold.train_rows) == normal_train - set(fold.val_rows)
        train_groups = set(manifest.group[list(fold.train_rows)])
        assert train_groups.isdisjoint(manifest.group[list(fold.val_rows)])
    assert make_folds(manifest, n_folds, seed=1) == folds


def test_folds_need_a_patient_group_per_fold() -> None:
    manifest = pd.DataFrame({"path": ["a", "b", "c"], "label": "normal", "split": "train", "group": ["p1", "p1", "p2"], "anomaly_type": ""})
    with pytest.raises(ValueError, match="3 folds need at least 3 patient groups"):
        make_folds(manifest, 3)


def test_validation_anomalies_come_only_from_train_and_val(manifest: pd.DataFrame) -> None:
    in_test = manifest[(manifest.split == "test") & (manifest.anomaly_type == "nodule")]
    assert len(in_test) > 0  # the test split does hold nodules the search must not take
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = select_validation_anomalies(manifest, "nodule", 3, seed=0)
    chosen = manifest.loc[list(rows)]
    assert len(chosen) == 3
    assert set(chosen.split) == {"val"} and set(chosen.label) == {"abnormal"} and set(chosen.anomaly_type) == {"nodule"}
    assert select_validation_anomalies(manifest, "nodule", 3, seed=0) == rows


def test_too_few_anomalies_warns_and_uses_all(manifest: pd.DataFrame) -> None:
    available = ((manifest.split != "test") & (manifest.anomaly_type == "effusion")).sum()
    with pytest.warns(UserWarning, match=f"only {available} validation anomalies"):
        rows = select_validation_anomalies(manifest, "effusion", 1000)
    assert len(rows) == available


def test_unknown_anomaly_type_names_the_available_ones(manifest: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"'tumor'.*available types: \['consolidation', 'effusion', 'nodule', 'pneumothorax'\]"):
        select_validation_anomalies(manifest, "tumor", 5)


def test_trainval_view_holds_no_test_row_or_file(phantoms: Path, tmp_path: Path) -> None:
    view = trainval_view(phantoms, tmp_path / "view")
    rows = read_manifest(view)
    original = read_manifest(phantoms)
    assert set(rows.split) == {"train", "val"}
    assert len(rows) == (original.split != "test").sum()
    files = {p.relative_to(view).as_posix() for p in view.rglob("*.png")}
    assert files == set(rows.path)  # the test images are not even reachable from the view
    assert all((view / rel).resolve() == (phantoms / rel).resolve() for rel in rows.path)
    assert trainval_view(phantoms, tmp_path / "view") == view  # a data version's view is reused
