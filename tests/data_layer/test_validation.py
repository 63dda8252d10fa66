"""The GX gate: a clean dataset passes; each kind of broken dataset fails naming the row/file."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_layer.phantoms import PhantomSpec, generate_phantoms
from data_layer.validation import (
    DataValidationError,
    ValidationRules,
    ensure_valid,
    validate_dataset,
)

RULES = ValidationRules(min_train_normals=4, min_size=16, max_examples=5, workers=2)
SIZE = 24


def build_dataset(root: Path, write_dicom: Callable[[Path, np.ndarray], Path]) -> Path:
    """7 train normals (one DICOM), 1 val normal, 2+2 test; one group per image, all distinct."""
    rng = np.random.default_rng(0)
    rows = (
        [("train", "normal")] * 7 + [("val", "normal")] + [("test", "normal")] * 2
        + [("test", "abnormal")] * 2
    )
    records = []
    for i, (split, label) in enumerate(rows):
        pixels = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        rel = f"images/{split}/img{i}.{'dcm' if i == 0 else 'png'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if i == 0:
            write_dicom(root / rel, pixels)
        else:
            Image.fromarray(pixels).save(root / rel)
        records.append({"path": rel, "label": label, "split": split, "group": f"P{i}",
                        "anomaly_type": "nodule" if label == "abnormal" else ""})
    pd.DataFrame(records).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture
def dataset(tmp_path: Path, write_dicom) -> Path:
    return build_dataset(tmp_path / "dataset", write_dicom)


def edit_manifest(root: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    change(df).to_csv(root / "manifest.csv", index=False)


def set_cell(row: int, column: str, value: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, column] = value
        return df
    return change


def corrupt_png(root: Path) -> None:
    (root / "images/train/img3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)


def truncate_dicom(root: Path) -> None:
    file = root / "images/train/img0.dcm"
    file.write_bytes(file.read_bytes()[:-300])


def missing_file(root: Path) -> None:
    (root / "images/test/img9.png").unlink()


def duplicate_across_splits(root: Path) -> None:
    shutil.copyfile(root / "images/train/img2.png", root / "images/test/img10.png")


def oversized_image(root: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)).save(
        root / "images/train/img4.png"
    )


def constant_image(root: Path) -> None:
    Image.new("L", (SIZE, SIZE), 128).save(root / "images/train/img5.png")


FAILURES = {
    "corrupt png": (corrupt_png, "readable images", "img3.png"),
    "truncated dicom": (truncate_dicom, "readable images", "img0.dcm"),
    "missing file": (missing_file, "readable images", "img9.png"),
    "oversized image": (oversized_image, "readable images", "img4.png"),
    "constant image": (constant_image, "not constant", "img5.png"),
    "duplicate across splits": (duplicate_across_splits, "no identical image in two splits",
                                "img10.png"),
    "unknown label": (lambda r: edit_manifest(r, set_cell(3, "label", "abnromal")),
                      "known labels", "abnromal"),
    "unknown split": (lambda r: edit_manifest(r, set_cell(3, "split", "training")),
                      "known splits", "training"),
    "escaping path": (lambda r: edit_manifest(r, set_cell(2, "path", "../outside.png")),
                      "paths inside the dataset", "../outside.png"),
    "absolute path": (lambda r: edit_manifest(r, set_cell(2, "path", "/etc/passwd")),
                      "paths inside the dataset", "/etc/passwd"),
    "empty group": (lambda r: edit_manifest(r, set_cell(5, "group", "")), "group filled in",
                    "line 7"),
    "duplicate path": (lambda r: edit_manifest(r, set_cell(2, "path", "images/train/img1.png")),
                       "unique paths", "images/train/img1.png"),
    "patient in train and test": (lambda r: edit_manifest(r, set_cell(10, "group", "P1")),
                                  "each group in one split", "P1"),
    "empty training set": (lambda r: edit_manifest(r, lambda df: df[df.split != "train"]),
                           "enough normal training images", "only 0 normal images"),
    "one class in test": (lambda r: edit_manifest(r, lambda df: df[df.label != "abnormal"]),
                          "both classes in test", "no abnormal images"),
}


@pytest.mark.parametrize("breakage", FAILURES.values(), ids=FAILURES.keys())
def test_each_failure_is_named_with_its_row_or_file(dataset: Path, breakage) -> None:
    breaks, check, culprit = breakage
    breaks(dataset)
    rules = RULES.model_copy(update={"max_pixels": 32 * 32})
    with pytest.raises(DataValidationError) as caught:
        ensure_valid(dataset, rules)
    error = pickle.loads(pickle.dumps(caught.value))  # Prefect pickles task exceptions
    assert str(error) == str(caught.value)
    failed = {failure.check: failure for failure in error.report.failures}
    assert check in failed, caught.value.report.summary()
    assert culprit in str(caught.value)
    assert failed[check].hint and failed[check].count >= 1


def test_clean_dataset_passes_and_writes_json_and_data_docs(dataset: Path, tmp_path: Path) -> None:
    report = ensure_valid(dataset, RULES, tmp_path / "report")
    assert report.success, report.summary()
    assert len(report.checks) == 18
    saved = json.loads(Path(report.json_path).read_text())
    assert saved["success"] is True and len(saved["checks"]) == 18
    index = Path(report.docs_path)
    assert index.name == "index.html" and "manifest" in index.read_text()
    assert list((index.parent / "validations").rglob("*.html"))


def test_failure_report_lists_first_examples_and_hints(dataset: Path, tmp_path: Path) -> None:
    for name in ("img1.png", "img2.png", "img3.png"):
        (dataset / "images/train" / name).write_bytes(b"not an image")
    rules = RULES.model_copy(update={"max_examples": 2})
    report = validate_dataset(dataset, rules, tmp_path / "report")
    assert not report.success
    [unreadable] = report.failures
    assert unreadable.count == 3 and len(unreadable.examples) == 2
    first = unreadable.examples[0]
    assert first["line"] == 3 and "cannot decode" in first["error"]
    assert unreadable.hint.startswith("remove or re-export the unreadable file(s) images/train/")
    saved = json.loads(Path(report.json_path).read_text())
    assert saved["success"] is False
    assert [check["count"] for check in saved["checks"] if not check["success"]] == [3]
    [images_page] = Path(report.docs_path).parent.rglob("validations/images/**/*.html")
    assert "images/train/img1.png" in images_page.read_text()


def test_missing_required_column_stops_before_reading_images(dataset: Path) -> None:
    edit_manifest(dataset, lambda df: df.drop(columns=["group"]))
    report = validate_dataset(dataset, RULES)
    assert [check.check for check in report.checks] == ["required columns"]
    assert "add the missing column(s) group" in report.summary()


@pytest.mark.parametrize("channels, passes", [(1, True), (3, False), ("any", True)])
def test_expected_channels(dataset: Path, channels, passes: bool) -> None:
    rules = RULES.model_copy(update={"expected_channels": channels})
    report = validate_dataset(dataset, rules)
    assert report.success is passes
    assert passes or report.failures[0].check == "expected channels"


def test_minimum_size(dataset: Path) -> None:
    report = validate_dataset(dataset, RULES.model_copy(update={"min_size": SIZE + 1}))
    assert [failure.check for failure in report.failures] == ["minimum size"]
    assert report.failures[0].count == 12


def test_generated_phantoms_pass_the_default_gate(tmp_path: Path) -> None:
    spec = PhantomSpec(n_train_normal=10, n_val_normal=2, n_test_normal=3, n_val_abnormal=2,
                       n_test_abnormal=3, size=32)
    report = validate_dataset(generate_phantoms(tmp_path / "phantoms", spec))
    assert report.success, report.summary()
