"""The one image transform (training, evaluation and serving) and the decoded-dataset cache.

Transform order follows the paper (docs/method.md §7): to L/RGB -> centre crop -> optional
histogram equalisation -> bilinear resize to size x size. Outputs stay uint8 (N x C x S x S) so a
cached dataset is 4x smaller than float; `model.dpa.to_model_range` turns a batch into [-1, 1] on the device.

`preprocess_dataset` decodes every manifest image once, in parallel, and caches the stacked tensor
under a key made of the data version, the manifest bytes, the config and a format version: a rerun
with the same inputs loads one file instead of decoding thousands. The cache is bounded
(`DPA_CACHE_MAX_GB`, least recently used entries go first; `data_layer.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, field_validator

from data_layer.cache import SUFFIX, load_entry, save_entry
from data_layer.images import read_image
from data_layer.manifest import (
    ABNORMAL,
    COLUMNS,
    LABEL,
    MANIFEST_NAME,
    PATH,
    read_manifest,
    resolve_path,
    selection_mask,
)

CACHE_FORMAT_VERSION = 1
"""Bump when the cached layout or the transform's behaviour changes: old entries then miss."""

log = logging.getLogger(__name__)


class PreprocessConfig(BaseModel):
    """How images become model input. `center_crop` is pixels (int) or a fraction of the shorter
    side (float in (0, 1]); NIH uses 224 of its 300-pixel import, i.e. 224 or 0.7467. Without a
    crop, non-square images are squashed to a square."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: Literal[1, 3] = 1
    center_crop: int | float | None = None
    equalize: bool = False
    size: int = Field(64, ge=4, le=1024)

    @field_validator("center_crop")
    @classmethod
    def _valid_crop(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("a fractional center_crop must be in (0, 1]; use an int for pixels")
        if isinstance(value, int) and value < 1:
            raise ValueError("center_crop in pixels must be >= 1")
        return value


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One image -> uint8 array C x size x size."""
    image = image.convert("L" if cfg.channels == 1 else "RGB")
    if cfg.center_crop is not None:
        image = _center_crop(image, cfg.center_crop)
    if cfg.equalize:
        image = ImageOps.equalize(image)
    image = image.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def preprocess_images(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Images -> uint8 tensor N x C x size x size (the serving path; datasets use the cache)."""
    if not images:
        return torch.empty((0, cfg.channels, cfg.size, cfg.size), dtype=torch.uint8)
    return torch.from_numpy(np.stack([preprocess_image(image, cfg) for image in images]))


@dataclass(frozen=True)
class PreprocessedDataset:
    """Decoded images aligned row for row with their manifest."""

    images: torch.Tensor
    manifest: pd.DataFrame
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> torch.Tensor:
        """1 for abnormal, 0 for normal: the targets of AUROC."""
        return torch.from_numpy((self.manifest[LABEL] == ABNORMAL).to_numpy().astype(np.int64))

    def subset(
        self,
        split: str | None = None,
        label: str | None = None,
        anomaly_types: str | Iterable[str] | None = None,
    ) -> PreprocessedDataset:
        """The rows matching every given filter (see `data_layer.manifest.select`)."""
        mask = selection_mask(self.manifest, split, label, anomaly_types)
        return PreprocessedDataset(
            images=self.images[torch.from_numpy(mask)],
            manifest=self.manifest[mask].reset_index(drop=True),
            from_cache=self.from_cache,
        )


def preprocess_dataset(
    dataset_dir: str | Path,
    cfg: PreprocessConfig,
    cache_dir: str | Path,
    data_version: str,
    max_workers: int | None = None,
    max_cache_bytes: int | None = None,
) -> PreprocessedDataset:
    """Decode and transform every manifest image once, or load the cached result. The cache is
    capped at `max_cache_bytes` (default: $DPA_CACHE_MAX_GB, see `data_layer.cache`)."""
    dataset_dir, cache_dir = Path(dataset_dir), Path(cache_dir)
    cache_file = cache_dir / f"{cache_key(dataset_dir, cfg, data_version)}{SUFFIX}"
    cached = load_entry(cache_file)
    if cached is not None:
        log.info("preprocessing cache hit: %s", cache_file)
        manifest = pd.DataFrame(cached["manifest"])
        return PreprocessedDataset(cached["images"], manifest, from_cache=True)
    started = time.perf_counter()
    manifest = read_manifest(dataset_dir)[list(COLUMNS)]
    paths = [resolve_path(dataset_dir, rel) for rel in manifest[PATH]]
    with ThreadPoolExecutor(max_workers or os.cpu_count()) as pool:
        arrays = list(pool.map(lambda path: _decode(path, cfg), paths))
    shape = (0, cfg.channels, cfg.size, cfg.size)
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(shape, dtype=torch.uint8)
    save_entry({"images": images, "manifest": manifest.to_dict(orient="list")}, cache_file, max_cache_bytes)
    seconds = time.perf_counter() - started
    log.info("preprocessed %d images in %.1f s -> %s", len(paths), seconds, cache_file)
    return PreprocessedDataset(images, manifest.reset_index(drop=True), from_cache=False)


def cache_key(dataset_dir: Path, cfg: PreprocessConfig, data_version: str) -> str:
    """sha256 of everything that determines the tensors. The manifest bytes are included so a
    reused data_version label (e.g. "dev") cannot serve tensors of an edited manifest."""
    manifest_hash = hashlib.sha256((dataset_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    key = {
        "format": CACHE_FORMAT_VERSION,
        "data_version": data_version,
        "manifest": manifest_hash,
        "config": cfg.model_dump_json(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _decode(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    image = read_image(path)
    try:
        return preprocess_image(image, cfg)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot preprocess ({exc}); check the preprocessing config") from exc


def model_view_box(width: int, height: int, crop: int | float | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the part of a width×height image the model sees: the centre
    crop, or the whole image (squashed to a square) without one. Heat maps are laid back over it."""
    if crop is None:
        return 0, 0, width, height
    side = round(crop * min(width, height)) if isinstance(crop, float) else crop
    if side > min(width, height):
        raise ValueError(f"center_crop {side} is larger than the {width}x{height} image")
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def _center_crop(image: Image.Image, crop: int | float) -> Image.Image:
    return image.crop(model_view_box(image.width, image.height, crop))
