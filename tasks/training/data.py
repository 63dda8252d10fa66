"""Resolve the run's dataset: import it into a staging folder, or pull a DVC-versioned dataset.

An import becomes the new version of its workspace (`datasets/<workspace>/`, `dvc add` + `dvc push`)
only after it passed the gate, so a bad import never overwrites the previous version; the production
dataset (`data/`) changes only when a run asks to promote (data_layer.versioning).
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
    """A dataset of the project at one version: `name` is `production` or a workspace."""

    path: Path
    version: str
    name: str = versioning.PRODUCTION

    @classmethod
    def at(cls, project: Path, name: str, version: str) -> DatasetRef:
        return cls(project / versioning.dataset_paths(name)[0], version, name)


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
def commit_dataset(project: Path, staged: Path, workspace: str) -> DatasetRef:
    """Make the validated staged dataset the current version of `workspace`: `dvc add` + `dvc push`."""
    versioning.init_repo(project)
    version = versioning.commit_dataset(project, staged, workspace)
    return DatasetRef.at(project, workspace, version)


@task(name="promote-dataset", retries=2, retry_delay_seconds=5)
def promote_dataset(project: Path, workspace: str) -> DatasetRef:
    """Make the workspace's current version the production dataset that scheduled retraining reads."""
    version = versioning.promote_dataset(project, workspace)
    print(f"data version {version} of workspace {workspace} is now the production dataset {project / versioning.DATA_DIR}")
    return DatasetRef.at(project, versioning.PRODUCTION, version)


@task(name="pull-dataset", retries=2, retry_delay_seconds=5)
def pull_dataset(project: Path, name: str = versioning.PRODUCTION) -> DatasetRef:
    """Use a DVC-tracked dataset (production by default), pulling it from the remote when missing or stale."""
    versioning.init_repo(project)
    version = versioning.resolve_dataset(project, name)
    return DatasetRef.at(project, name, version)
