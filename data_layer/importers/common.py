"""What every importer shares: the manifest row it builds, the group-aware split, and the staged
write of images plus manifest.csv into the dataset directory."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_layer.images import SUPPORTED_SUFFIXES, read_image, write_png
from data_layer.manifest import (
    ABNORMAL,
    ANOMALY_TYPE,
    GROUP,
    LABEL,
    PATH,
    SPLIT,
    SPLITS,
    ManifestError,
    staged_dataset,
    write_manifest,
)
from data_layer.pixels import array_to_image

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
"""train / val / test shares of the groups when a source has no split of its own."""


class SourceUnavailableError(FileNotFoundError):
    """The source data is not on disk (and could not be downloaded); says where to put it."""


@dataclass(frozen=True)
class Item:
    """One manifest row plus how to produce its image file at `path` inside the dataset."""

    path: str
    label: str
    split: str
    group: str
    anomaly_type: str
    write: Callable[[Path], None]


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


def with_splits(
    items: list[Item], fractions: tuple[float, float, float], seed: int
) -> list[Item]:
    groups = [item.group for item in items]
    splits = assign_splits(groups, [item.label == ABNORMAL for item in items], fractions, seed)
    return [replace(item, split=split) for item, split in zip(items, splits)]


def write_dataset(items: Sequence[Item], out_dir: str | Path, overwrite: bool) -> Path:
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


def copy_from(source: Path) -> Callable[[Path], None]:
    def write(dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    return write


def png_of(array: np.ndarray) -> Callable[[Path], None]:
    return lambda dest: write_png(array_to_image(array), dest)


def resized_png_of(source: Path, size: int) -> Callable[[Path], None]:
    def write(dest: Path) -> None:
        image = read_image(source).convert("L").resize((size, size), Image.Resampling.BILINEAR)
        write_png(image, dest)

    return write


def image_files(directory: Path) -> list[Path]:
    """Supported image files below `directory`, sorted; hidden files skipped, others reported."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    skipped = [path for path in files if path.suffix.lower() not in SUPPORTED_SUFFIXES]
    if skipped:
        log.warning("skipping %d non-image files in %s, e.g. %s", len(skipped), directory, skipped[:3])
    return [path for path in files if path.suffix.lower() in SUPPORTED_SUFFIXES]


def ensure_file(path: Path, url: str, download: bool) -> None:
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
