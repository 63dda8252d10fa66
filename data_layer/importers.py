"""Importers: turn a source into a dataset directory (DESIGN.md §3: images + manifest.csv).

Each `import_<kind>(source, out_dir, ...) -> out_dir` lists the source's images as manifest rows,
then writes them through `_write_dataset`, which builds the dataset in a staging directory and
moves it into place only when complete. Files in a supported format are copied byte for byte;
arrays (MedMNIST, CIFAR10, SVHN) and the resized NIH images are written as deterministic PNGs.
Patient identifiers become salted hashes (`salt`, a secret kept out of git) before they reach
the manifest. Content checks are the validation gate's job; importers only refuse what they
cannot map (an unknown label, a file outside the source, a missing file).
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from data_layer.dicom import dicom_group_id
from data_layer.images import SUPPORTED_SUFFIXES, array_to_image, read_image, write_png
from data_layer.manifest import (
    ABNORMAL,
    ANOMALY_TYPE,
    COLUMNS,
    GROUP,
    LABEL,
    LABELS,
    NORMAL,
    PATH,
    SPLIT,
    SPLITS,
    ManifestError,
    salted_group_id,
    staged_dataset,
    write_manifest,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
"""train / val / test shares of the groups when a source has no split of its own."""


class SourceUnavailableError(FileNotFoundError):
    """The source data is not on disk (and could not be downloaded); says where to put it."""


@dataclass(frozen=True)
class _Item:
    """One manifest row plus how to produce its image file at `path` inside the dataset."""

    path: str
    label: str
    split: str
    group: str
    anomaly_type: str
    write: Callable[[Path], None]


# --- folder layout and CSV -------------------------------------------------------------------


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
        items = _with_splits(items, fractions, seed)
    return _write_dataset(items, out_dir, overwrite)


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
        items = _with_splits(items, fractions, seed)
    return _write_dataset(items, out_dir, overwrite)


def assign_splits(
    groups: Sequence[str],
    abnormal: Sequence[bool],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """Seeded, group-aware split, one value per image. Whole groups move together. Normal-only
    groups are shuffled and cut by `fractions` into train/val/test. Groups with any abnormal image
    never go to train (training sees normals only): they are cut into val/test in the ratio of
    the val and test fractions."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative shares (train, val, test), not {fractions}")
    train, val, test = (share / sum(fractions) for share in fractions)
    flags = pd.Series(list(abnormal), dtype=bool).groupby(pd.Series(list(groups), dtype=str)).any()
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for has_abnormal, shares in ((False, (train, val, test)), (True, (0.0, val, test))):
        names = sorted(flags.index[flags.to_numpy() == has_abnormal])
        split_of |= _cut(list(rng.permutation(names)), shares)
    return [split_of[group] for group in groups]


def _cut(groups: list[str], shares: tuple[float, float, float]) -> dict[str, str]:
    total = sum(shares) or 1.0
    bounds = np.round(np.cumsum(shares) / total * len(groups)).astype(int)
    positions = np.searchsorted(bounds, np.arange(len(groups)), side="right")
    return {group: SPLITS[int(position)] for group, position in zip(groups, positions)}


def _with_splits(
    items: list[_Item], fractions: tuple[float, float, float], seed: int
) -> list[_Item]:
    groups = [item.group for item in items]
    splits = assign_splits(groups, [item.label == ABNORMAL for item in items], fractions, seed)
    return [replace(item, split=split) for item, split in zip(items, splits)]


def _class_folder_items(root: Path, split: str, source: Path, salt: str | None) -> list[_Item]:
    if not (root / NORMAL).is_dir() and not (root / ABNORMAL).is_dir():
        raise SourceUnavailableError(
            f"{root}: expected a normal/ and/or abnormal/<type>/ folder "
            "(optionally inside train/, val/ and test/)."
        )
    items = []
    for label in LABELS:
        for file in _image_files(root / label):
            parts = file.relative_to(root / label).parts
            anomaly_type = parts[0] if label == ABNORMAL and len(parts) > 1 else ""
            inner = parts[1:] if anomaly_type else parts
            group = _folder_group(file, inner, salt)
            rel = f"images/{file.relative_to(source).as_posix()}"
            items.append(_Item(rel, label, split, group, anomaly_type, _copy_from(file)))
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
) -> _Item:
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
    return _Item(rel, label, split, group, anomaly_type, _copy_from(file))


# --- public datasets ---------------------------------------------------------------------------


def import_medmnist(
    npz_path: str | Path,
    out_dir: str | Path,
    *,
    download: bool = False,
    normal_label: int = 0,
    class_names: Mapping[int, str] | None = None,
    url: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Import a single-label MedMNIST `.npz` (e.g. pneumoniamnist.npz, pneumoniamnist_64.npz)
    with its official train/val/test splits. `normal_label` is normal, every other class is
    abnormal with anomaly_type = its class name. All rows are kept; training reads only the
    normal train rows. MedMNIST has no patient ids, so each image is its own group."""
    npz_path = Path(npz_path)
    _ensure_file(npz_path, url or MEDMNIST_URL.format(name=npz_path.name), download)
    pneumonia = npz_path.name.startswith("pneumoniamnist")
    names = dict(class_names or ({1: "pneumonia"} if pneumonia else {}))
    items = []
    with np.load(npz_path, allow_pickle=False) as data:
        for split in SPLITS:
            images, labels = data[f"{split}_images"], data[f"{split}_labels"]
            if labels.ndim > 1 and labels.shape[1] > 1:
                raise ValueError(f"{npz_path}: multi-label MedMNIST is not supported ({labels.shape})")
            for index, (image, target) in enumerate(zip(images, labels.reshape(-1))):
                label = NORMAL if target == normal_label else ABNORMAL
                kind = "" if label == NORMAL else names.get(int(target), f"class_{int(target)}")
                group = f"{split}-{index:06d}"
                rel = f"images/{split}/{group}.png"
                items.append(_Item(rel, label, split, group, kind, _png_of(image)))
    return _write_dataset(items, out_dir, overwrite)


def import_cifar10(
    root: str | Path,
    out_dir: str | Path,
    *,
    normal_class: int | str,
    val_class: int | str | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> Path:
    """CIFAR10 one-vs-rest (dpa_method.md §7): see `_one_vs_rest`."""
    from torchvision.datasets import CIFAR10

    def load(train: bool) -> CIFAR10:
        return _torchvision("CIFAR10", root, lambda: CIFAR10(root, train=train, download=download))

    train, test = load(True), load(False)
    sets = {
        "train": (train.data, np.asarray(train.targets)),
        "test": (test.data, np.asarray(test.targets)),
    }
    return _one_vs_rest(sets, list(train.classes), normal_class, val_class, out_dir, overwrite)


def import_svhn(
    root: str | Path,
    out_dir: str | Path,
    *,
    normal_class: int | str,
    val_class: int | str | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> Path:
    """SVHN one-vs-rest on its `train` and `test` splits (not `extra`); images stay RGB here, the
    paper's grayscale is a preprocessing setting (channels=1)."""
    from torchvision.datasets import SVHN

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        svhn = _torchvision("SVHN", root, lambda: SVHN(root, split=split, download=download))
        return svhn.data.transpose(0, 2, 3, 1), svhn.labels  # torchvision keeps N x C x H x W

    sets = {split: load(split) for split in ("train", "test")}
    digits = [str(digit) for digit in range(10)]
    return _one_vs_rest(sets, digits, normal_class, val_class, out_dir, overwrite)


def _one_vs_rest(
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    normal_class: int | str,
    val_class: int | str | None,
    out_dir: str | Path,
    overwrite: bool,
) -> Path:
    """The paper's protocol: train = the normal class's train images; test = the whole test split
    (normal class normal, the other classes abnormal with anomaly_type = class name); optional
    val = the train images of `val_class`, the few anomalies for hyperparameter search."""
    normal = _class_index(normal_class, classes)
    held_out = None if val_class is None else _class_index(val_class, classes)
    items = []
    for source_split, (images, targets) in sets.items():
        for index, (image, target) in enumerate(zip(images, targets)):
            target = int(target)
            if source_split == "test":
                split, label = "test", NORMAL if target == normal else ABNORMAL
            elif target in (normal, held_out):
                split, label = ("train", NORMAL) if target == normal else ("val", ABNORMAL)
            else:
                continue
            group = f"{source_split}-{index:05d}"
            kind = "" if label == NORMAL else classes[target]
            rel = f"images/{split}/{classes[target]}/{group}.png"
            items.append(_Item(rel, label, split, group, kind, _png_of(image)))
    return _write_dataset(items, out_dir, overwrite)


def _class_index(value: int | str, classes: list[str]) -> int:
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    if isinstance(value, int) and 0 <= value < len(classes):
        return value
    raise ValueError(f"unknown class {value!r}; use an index 0..{len(classes) - 1} or one of {classes}")


def _torchvision(name: str, root: str | Path, load: Callable[[], T]) -> T:
    """Run a torchvision dataset constructor, turning its failures into a clear message."""
    try:
        return load()
    except (RuntimeError, OSError) as exc:
        raise SourceUnavailableError(
            f"{name} is not available under {root} ({exc}). Place the official files there "
            "(torchvision's layout), or pass download=True on a machine that is online."
        ) from exc


def import_nih(
    root: str | Path,
    out_dir: str | Path,
    *,
    salt: str,
    view: Literal["PA", "AP"] | None = "PA",
    val_fraction: float = 0.0,
    val_anomaly_label: str | None = None,
    size: int = 300,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """NIH ChestX-ray14 from a local download: `Data_Entry_2017.csv`, `train_val_list.txt`,
    `test_list.txt` and the PNGs under `images*/`. Rows are filtered by `View Position`.

    train: the 'No Finding' images of train_val_list. test: all of test_list ('No Finding' is
    normal, any other label set abnormal with anomaly_type = the label string). With val_fraction,
    that share of train_val patients goes to val with their normals plus, if val_anomaly_label
    is set, their images labelled exactly that (the paper uses 'Infiltration'); other abnormal
    train_val images are not used. group = salted hash of Patient ID. Each image is converted to
    L and resized to size x size (bilinear) at import, as the paper's offline step; the centre
    crop (224 of 300), equalisation (AP) and resize to 64 are PreprocessConfig settings.
    """
    root = Path(root)
    entries = _nih_entries(root, view)
    val_patients = _pick_val_patients(entries, val_fraction, seed)
    files = _nih_files(root, entries.index)
    items = []
    for name, entry in entries.iterrows():
        split, label = _nih_row(entry, entry["Patient ID"] in val_patients, val_anomaly_label)
        if split:
            anomaly_type = "" if label == NORMAL else entry["Finding Labels"]
            group = salted_group_id(entry["Patient ID"], salt)
            rel = f"images/{split}/{Path(name).stem}.png"
            write = _resized_png_of(files[name], size)
            items.append(_Item(rel, label, split, group, anomaly_type, write))
    return _write_dataset(items, out_dir, overwrite)


def _nih_entries(root: Path, view: str | None) -> pd.DataFrame:
    csv = root / "Data_Entry_2017.csv"
    lists = {name: root / f"{name}.txt" for name in ("train_val_list", "test_list")}
    for path in (csv, *lists.values()):
        if not path.is_file():
            raise SourceUnavailableError(
                f"{path} not found: download ChestX-ray14 from the NIH site and unpack it in {root}."
            )
    entries = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("Image Index")
    if view is not None:
        entries = entries[entries["View Position"] == view]
    official = pd.Series("", index=entries.index)
    official[entries.index.isin(lists["train_val_list"].read_text().split())] = "train_val"
    official[entries.index.isin(lists["test_list"].read_text().split())] = "test"
    return entries.assign(official=official)[official != ""].sort_index()


def _pick_val_patients(entries: pd.DataFrame, val_fraction: float, seed: int) -> set[str]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = sorted(set(entries.loc[entries["official"] == "train_val", "Patient ID"]))
    count = round(val_fraction * len(patients))
    return set(np.random.default_rng(seed).permutation(patients)[:count]) if count else set()


def _nih_row(entry: pd.Series, val_patient: bool, val_anomaly_label: str | None) -> tuple[str, str]:
    """(split, label) of one image; split "" drops it."""
    normal = entry["Finding Labels"] == "No Finding"
    label = NORMAL if normal else ABNORMAL
    if entry["official"] == "test":
        return "test", label
    if normal:
        return ("val" if val_patient else "train"), label
    if val_patient and entry["Finding Labels"] == val_anomaly_label:
        return "val", label
    return "", label


def _nih_files(root: Path, names: pd.Index) -> dict[str, Path]:
    folders = sorted(root.glob("images*"))
    found = {file.name: file for folder in folders for file in folder.rglob("*.png")}
    missing = [name for name in names if name not in found]
    if missing:
        raise SourceUnavailableError(
            f"{len(missing)} listed images are missing under {root}/images*/ (e.g. {missing[:3]}); "
            "unpack all image archives."
        )
    return found


def import_camelyon16(root: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Camelyon16 patch folders, one folder per slide (group = slide id): `normal/<slide>/` train
    normals, `tumor_train/<slide>/` validation anomalies (optional), `test/normal/<slide>/` and
    `test/tumor/<slide>/` the test set. Patches are copied as they are (JPEG)."""
    root = Path(root)
    layout = [
        ("normal", "train", NORMAL, True),
        ("tumor_train", "val", ABNORMAL, False),
        ("test/normal", "test", NORMAL, True),
        ("test/tumor", "test", ABNORMAL, True),
    ]
    items = []
    for folder, split, label, required in layout:
        if not (root / folder).is_dir():
            if required:
                raise SourceUnavailableError(f"{root / folder} not found: not a Camelyon16 patch layout.")
            continue
        for file in _image_files(root / folder):
            slide = file.relative_to(root / folder).parts[0]
            kind = "tumor" if label == ABNORMAL else ""
            rel = f"images/{file.relative_to(root).as_posix()}"
            items.append(_Item(rel, label, split, slide, kind, _copy_from(file)))
    return _write_dataset(items, out_dir, overwrite)


# --- shared plumbing ---------------------------------------------------------------------------


def _write_dataset(items: Sequence[_Item], out_dir: str | Path, overwrite: bool) -> Path:
    """Write every image and the manifest into a staged directory, then move it to `out_dir`."""
    if not items:
        raise SourceUnavailableError(f"no images found to import into {out_dir}")
    paths = pd.Series([item.path for item in items])
    if paths.duplicated().any():
        clashes = paths[paths.duplicated()].tolist()[:5]
        raise ManifestError(f"several images map to the same dataset path, e.g. {clashes}")
    with staged_dataset(out_dir, overwrite) as stage:
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(lambda item: item.write(stage / item.path), items))
        rows = [
            {PATH: i.path, LABEL: i.label, SPLIT: i.split, GROUP: i.group, ANOMALY_TYPE: i.anomaly_type}
            for i in items
        ]
        write_manifest(pd.DataFrame(rows), stage)
    log.info("imported %d images into %s", len(items), out_dir)
    return Path(out_dir)


def _copy_from(source: Path) -> Callable[[Path], None]:
    def write(dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    return write


def _png_of(array: np.ndarray) -> Callable[[Path], None]:
    return lambda dest: write_png(array_to_image(array), dest)


def _resized_png_of(source: Path, size: int) -> Callable[[Path], None]:
    def write(dest: Path) -> None:
        image = read_image(source).convert("L").resize((size, size), Image.Resampling.BILINEAR)
        write_png(image, dest)

    return write


def _image_files(directory: Path) -> list[Path]:
    """Supported image files below `directory`, sorted; hidden files skipped, others reported."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    skipped = [path for path in files if path.suffix.lower() not in SUPPORTED_SUFFIXES]
    if skipped:
        log.warning("skipping %d non-image files in %s, e.g. %s", len(skipped), directory, skipped[:3])
    return [path for path in files if path.suffix.lower() in SUPPORTED_SUFFIXES]


def _ensure_file(path: Path, url: str, download: bool) -> None:
    """Make sure `path` exists, downloading `url` into it when allowed."""
    if path.is_file():
        return
    if not download:
        raise SourceUnavailableError(
            f"{path} not found. Download {url} and place it there, or pass download=True."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:  # URLError and socket timeouts included
        partial.unlink(missing_ok=True)
        raise SourceUnavailableError(
            f"cannot download {url} ({exc}). Offline? Download it elsewhere and place it at {path}."
        ) from exc
    os.replace(partial, path)
