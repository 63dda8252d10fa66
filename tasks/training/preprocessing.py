"""Decode, transform and cache the dataset as one uint8 tensor (a cache hit skips the work)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_layer.preprocessing import PreprocessConfig, PreprocessedDataset, preprocess_dataset


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess(dataset_dir: Path, cfg: PreprocessConfig, cache_dir: Path, data_version: str) -> PreprocessedDataset:
    """Our own cache is keyed by (data version, manifest, parameters), so Prefect's is not needed."""
    return preprocess_dataset(dataset_dir, cfg, cache_dir, data_version)
