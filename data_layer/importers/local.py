"""Importers of data already on disk in the user's own layout: class folders, or a CSV listing images."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from data_layer.dicom import dicom_group_id
from data_layer.importers.common import (
    DEFAULT_FRACTIONS,
    Item,
    SourceUnavailableError,
    copy_from,
    image_files,
    with_splits,
    write_dataset,
)
from data_layer.manifest import ABNORMAL, ANOMALY_TYPE, COLUMNS, GROUP, LABEL, LABELS, NORMAL, PATH, SPLIT, SPLITS, ManifestError


def import_folder(
    source: str | Path,
    out_dir: str | Path,
    *,
    salt: str | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import `normal/` and `abnormal/<type>/` folders, optionally under `train/ val/ test/`.

    group: the salted PatientID for DICOM files; otherwise the first folder below the class (or
    type) folder, e.g. `normal/<patient>/a.png`; otherwise the file name. Without split folders,
    `assign_splits` splits whole groups (train gets normal-only groups).
    """
    source = Path(source)
    split_dirs = [split for split in SPLITS if (source / split).is_dir()]
    roots = [(source / split, split) for split in split_dirs] or [(source, "")]
    items = [item for root, split in roots for item in _class_folder_items(root, split, source, salt)]
    if not split_dirs:
        items = with_splits(items, fractions, seed)
    return write_dataset(items, out_dir, overwrite)


def import_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    images_root: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    label_map: Mapping[str, str] | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import a CSV that lists images. `columns` maps contract names (path, label, split, group,
    anomaly_type) to the CSV's own headers; only path and label are required. `label_map` maps
    the CSV's label values (e.g. "0", "No Finding") to normal/abnormal. Paths are relative to
    `images_root` (default: the CSV's folder) and must stay inside it. Without a split column,
    `assign_splits` decides; without a group column, each image is its own group."""
    csv_path = Path(csv_path)
    root = Path(images_root or csv_path.parent).resolve()
    names = {column: column for column in COLUMNS} | dict(columns or {})
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for required in (PATH, LABEL):
        if names[required] not in table.columns:
            raise ManifestError(
                f"{csv_path}: no column {names[required]!r} for {required}; "
                f"pass columns={{'{required}': '<your header>'}}. Headers: {list(table.columns)}"
            )
    items = [
        _csv_item(csv_path, line, record, names, root, label_map or {})
        for line, record in enumerate(table.to_dict(orient="records"), start=2)
    ]
    if names[SPLIT] not in table.columns:
        items = with_splits(items, fractions, seed)
    return write_dataset(items, out_dir, overwrite)


def _class_folder_items(root: Path, split: str, source: Path, salt: str | None) -> list[Item]:
    if not (root / NORMAL).is_dir() and not (root / ABNORMAL).is_dir():
        raise SourceUnavailableError(
            f"{root}: expected a normal/ and/or abnormal/<type>/ folder "
            "(optionally inside train/, val/ and test/)."
        )
    items = []
    for label in LABELS:
        for file in image_files(root / label):
            parts = file.relative_to(root / label).parts
            anomaly_type = parts[0] if label == ABNORMAL and len(parts) > 1 else ""
            inner = parts[1:] if anomaly_type else parts
            group = _folder_group(file, inner, salt)
            rel = f"images/{file.relative_to(source).as_posix()}"
            items.append(Item(rel, label, split, group, anomaly_type, copy_from(file)))
    return items


def _folder_group(file: Path, inner: tuple[str, ...], salt: str | None) -> str:
    if file.suffix.lower() in (".dcm", ".dicom"):
        if salt is None:
            raise ValueError(
                f"{file}: DICOM files are grouped by a salted hash of PatientID; pass salt=<secret> "
                "(keep it out of git, e.g. in an environment variable)."
            )
        return dicom_group_id(file, salt)
    return inner[0] if len(inner) > 1 else Path(inner[0]).stem


def _csv_item(
    csv_path: Path, line: int, record: dict[str, str], names: dict[str, str], root: Path,
    label_map: Mapping[str, str],
) -> Item:
    where = f"{csv_path} line {line}"
    raw_label = record[names[LABEL]]
    label = label_map.get(raw_label, raw_label)
    if label not in LABELS:
        raise ManifestError(
            f"{where}: label {raw_label!r} is neither normal nor abnormal; "
            f"pass label_map={{'{raw_label}': 'normal' or 'abnormal'}}."
        )
    split = record.get(names[SPLIT], "")
    if names[SPLIT] in record and split not in SPLITS:
        raise ManifestError(f"{where}: split {split!r} is not one of {SPLITS}; fix the CSV.")
    file = (root / record[names[PATH]]).resolve()
    if not file.is_relative_to(root):
        raise ManifestError(f"{where}: {record[names[PATH]]!r} lies outside {root}; pass images_root.")
    if not file.is_file():
        raise SourceUnavailableError(f"{where}: image {file} not found; fix the path or images_root.")
    rel = f"images/{file.relative_to(root).as_posix()}"
    group = record.get(names[GROUP]) or file.stem
    anomaly_type = record.get(names[ANOMALY_TYPE], "") if label == ABNORMAL else ""
    return Item(rel, label, split, group, anomaly_type, copy_from(file))
