"""Resolve the run's dataset: import it into a staging folder, or pull the DVC-versioned data/.

An imported dataset replaces data/ (and gets `dvc add` + `dvc push`) only after it passed the
gate, so a bad import never overwrites the previous dataset version.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from data_layer import importers, versioning
from data_layer.phantoms import PhantomSpec, generate_phantoms
from tasks.config import DataSource


@dataclass(frozen=True)
class DatasetRef:
    path: Path
    version: str


def import_to(source: DataSource, out_dir: Path) -> Path:
    """Run the importer named by `source.importer` with the source's other fields as arguments."""
    options = dict(source.model_extra or {})
    if source.importer == "phantoms":
        return generate_phantoms(out_dir, PhantomSpec(**options), overwrite=True)
    importer = getattr(importers, f"import_{source.importer}")
    return importer(out_dir=out_dir, **options)


@task(name="stage-dataset", retries=2, retry_delay_seconds=5)
def stage_dataset(source: DataSource, staging_dir: Path) -> Path:
    """Import into a fresh staging folder (retried: downloads and network file systems fail transiently)."""
    shutil.rmtree(staging_dir, ignore_errors=True)
    return import_to(source, staging_dir)


@task(name="commit-dataset", retries=2, retry_delay_seconds=5)
def commit_dataset(project: Path, staged: Path) -> DatasetRef:
    """Make the validated staged dataset the active data/ version: `dvc add` + `dvc push`."""
    versioning.init_repo(project)
    version = versioning.commit_dataset(project, staged)
    return DatasetRef(project / "data", version)


@task(name="pull-dataset", retries=2, retry_delay_seconds=5)
def pull_dataset(project: Path) -> DatasetRef:
    """Use the DVC-tracked data/, pulling it from the remote when missing or stale."""
    versioning.init_repo(project)
    version = versioning.resolve_dataset(project)
    return DatasetRef(project / "data", version)
