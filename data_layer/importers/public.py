"""Importers of the paper's public datasets (MedMNIST, CIFAR10, SVHN, NIH ChestX-ray14, Camelyon16)
from a local download; only MedMNIST is fetched when `download=True` (nothing else can be)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pandas as pd

from data_layer.importers.common import (
    Item,
    SourceUnavailableError,
    copy_from,
    ensure_file,
    image_files,
    png_of,
    resized_png_of,
    write_dataset,
)
from data_layer.manifest import ABNORMAL, NORMAL, SPLITS, salted_group_id

T = TypeVar("T")

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"


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
    ensure_file(npz_path, url or MEDMNIST_URL.format(name=npz_path.name), download)
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
                items.append(Item(rel, label, split, group, kind, png_of(image)))
    return write_dataset(items, out_dir, overwrite)


def import_cifar10(
    root: str | Path,
    out_dir: str | Path,
    *,
    normal_class: int | str,
    val_class: int | str | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> Path:
    """CIFAR10 one-vs-rest (docs/method.md §7): see `_one_vs_rest`."""
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
            items.append(Item(rel, label, split, group, kind, png_of(image)))
    return write_dataset(items, out_dir, overwrite)


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
            write = resized_png_of(files[name], size)
            items.append(Item(rel, label, split, group, anomaly_type, write))
    return write_dataset(items, out_dir, overwrite)


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
        for file in image_files(root / folder):
            slide = file.relative_to(root / folder).parts[0]
            kind = "tumor" if label == ABNORMAL else ""
            rel = f"images/{file.relative_to(root).as_posix()}"
            items.append(Item(rel, label, split, slide, kind, copy_from(file)))
    return write_dataset(items, out_dir, overwrite)
