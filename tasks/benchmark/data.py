"""What a benchmark runs on: its presets (names, globs, or YAML files of one's own) resolved with
the shared overrides, and each preset's data imported once, validated and content-hashed.

A benchmark never touches the project's DVC-versioned data/: every data source gets its own folder
under `.dpa/benchmark/data/`, imported once and validated once, so many presets (and reruns) share
it and two sources never overwrite each other.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from pydantic import ValidationError

from data_layer import importers
from data_layer.manifest import MANIFEST_NAME, PATH, read_manifest, resolve_path
from data_layer.validation import REPORT_NAME, ValidationReport, ValidationRules
from tasks.config import CONFIG_DIR, PRESETS, RunConfig, apply_overrides
from tasks.training.data import DatasetRef, pull_dataset, stage_dataset
from tasks.training.validation import validate


def preset_files(patterns: list[str]) -> list[Path]:
    """Each pattern is a preset name or glob over configs/ (`cifar10_class*`), or a path or glob of
    preset YAML files; the presets in the order given, each once, names unique (they key the table)."""
    files: list[Path] = []
    for pattern in patterns:
        if pattern.endswith((".yaml", ".yml")) or "/" in pattern:
            matches = [Path(p).resolve() for p in sorted(glob.glob(pattern))]
        else:
            matches = [CONFIG_DIR / f"{name}.yaml" for name in fnmatch.filter(PRESETS, pattern)]
        if not matches:
            raise ValueError(f"preset {pattern!r} matches no preset; known presets: {', '.join(PRESETS)} (or give .yaml paths)")
        files += [m for m in matches if m not in files]
    stems = [f.stem for f in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ValueError(f"two preset files share the name(s) {clashes}: rename one, the name keys the table")
    return files


def takes_root(importer: str) -> bool:
    """Whether the importer reads a local download from a `root` folder (CIFAR10, SVHN, NIH, Camelyon16)."""
    function = getattr(importers, f"import_{importer}", None)
    return function is not None and "root" in inspect.signature(function).parameters


def load_config(file: Path, overrides: dict[str, Any], dataset_root: str | None = None) -> RunConfig:
    """One preset file with the benchmark's overrides; `dataset_root` becomes `dataset.root` where the
    importer takes one. A wrong key or value names the file and the overrides."""
    doc = yaml.safe_load(file.read_text()) or {}
    if dataset_root and takes_root(doc.get("dataset", {}).get("importer", "phantoms")):
        overrides = {"dataset.root": dataset_root, **overrides}
    doc = apply_overrides(doc, overrides)
    doc["preset"] = file.stem
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as error:
        raise ValueError(f"{file}: not a valid configuration with the overrides {overrides}: {error}") from None


def source_digest(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.dataset.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def content_digest(dataset_dir: Path) -> str:
    """sha256 of the manifest and of every file it lists: the data version of an imported source."""
    digest = hashlib.sha256((dataset_dir / MANIFEST_NAME).read_bytes())
    for rel in read_manifest(dataset_dir)[PATH]:
        with resolve_path(dataset_dir, rel).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:32]


def passed(report_dir: Path, rules: ValidationRules) -> bool:
    """Whether this data already passed the gate under these rules."""
    report = report_dir / REPORT_NAME
    if not report.is_file():
        return False
    saved = ValidationReport.model_validate_json(report.read_text())
    return saved.success and saved.rules == rules


def prepare_dataset(cfg: RunConfig, project: Path) -> DatasetRef:
    """The preset's data, validated: a DVC-versioned dataset of the project for `importer: dvc`
    (production data/ unless a workspace is named), else the source imported once into its own
    folder (one process at a time per source)."""
    if cfg.dataset.importer == "dvc":
        dataset = pull_dataset(project, cfg.dataset.workspace_for(cfg.preset))
        validate(dataset.path, cfg.validation, project / ".dpa" / "benchmark" / "reports" / dataset.version)
        return dataset
    home = project / ".dpa" / "benchmark" / "data" / source_digest(cfg)
    home.mkdir(parents=True, exist_ok=True)
    dataset_dir, report_dir, version_file = home / "dataset", home / "validation", home / "data_version"
    with FileLock(home / "lock"):
        if not (dataset_dir / MANIFEST_NAME).is_file():
            version_file.unlink(missing_ok=True)
            stage_dataset(cfg.dataset, dataset_dir)
        if not passed(report_dir, cfg.validation):
            validate(dataset_dir, cfg.validation, report_dir)
        if not version_file.is_file():
            version_file.write_text(content_digest(dataset_dir))
        return DatasetRef(dataset_dir, version_file.read_text())
