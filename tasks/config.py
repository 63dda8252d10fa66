"""The one typed configuration of a pipeline run, and how presets and overrides resolve into it.

A flow takes `PipelineParams` (what a person fills in: a preset name, dotted overrides, the data
source, the registry name); `resolve_run_config` turns it into `RunConfig`, the fully resolved
configuration that every task reads and MLflow logs as params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_layer.preprocessing import PreprocessConfig
from data_layer.validation import ValidationRules
from model.config import DPAConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def project_dir() -> Path:
    """Where the active dataset (data/), caches and the embedded MLflow store live: DPA_PROJECT_DIR or the repo."""
    return Path(os.environ.get("DPA_PROJECT_DIR", PROJECT_ROOT)).resolve()


class DataSource(BaseModel):
    """Where the dataset comes from. `dvc` uses the versioned data/ as it is; the others import first."""

    model_config = ConfigDict(extra="allow")

    importer: Literal["dvc", "phantoms", "folder", "csv", "medmnist", "cifar10", "svhn", "nih", "camelyon16"] = "phantoms"


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("dpa-phantoms", description="registered model name (one per task)")
    promotion_margin: float = Field(
        0.0, description="superiority gate: the AUROC difference must be significantly above this (H0: difference ≤ margin)"
    )
    auroc_floor: float = Field(0.6, description="never promote a model whose test AUROC is below this")
    gate: Literal["superiority", "non_inferiority"] = Field(
        "superiority",
        description="superiority: promote when the challenger's AUROC is significantly above the champion's "
        "(by more than promotion_margin); non_inferiority: when it is significantly above champion − non_inferiority_margin",
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided significance level of the paired DeLong test")
    non_inferiority_margin: float = Field(0.02, ge=0, description="AUROC loss tolerated by the non_inferiority gate")
    threshold_quantile: float = Field(
        0.95, description="operating threshold = this quantile of the scores of normal validation images"
    )


class RunConfig(BaseModel):
    """Everything one pipeline run needs, resolved."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    description: str = ""
    dataset: DataSource = DataSource()
    preprocess: PreprocessConfig
    dpa: DPAConfig
    validation: ValidationRules = ValidationRules()
    registry: RegistryConfig = RegistryConfig()
    experiment: str | None = Field(None, description="MLflow experiment; default: the preset name")

    @model_validator(mode="after")
    def _images_fit_the_network(self) -> RunConfig:
        """Caught here, before any data are imported or decoded, rather than at training start."""
        net = self.dpa.network
        if self.preprocess.channels != net.image_channels:
            raise ValueError(f"preprocess.channels={self.preprocess.channels} but dpa.network.image_channels={net.image_channels}")
        if self.preprocess.size < net.max_res:
            raise ValueError(f"preprocess.size={self.preprocess.size} is below dpa.network.max_res={net.max_res}")
        return self


class PipelineParams(BaseModel):
    """What a person chooses when starting a run (the Prefect UI form, the CLI flags)."""

    preset: str = Field("demo", description=f"a preset in configs/ ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted keys into the preset, e.g. {'dpa.train.stab_iters': 500}"
    )
    dataset: DataSource | None = Field(None, description="data source; default: the preset's")
    model_name: str | None = Field(None, description="registered model name; default: the preset's registry.model_name")


def load_preset(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}")
    return yaml.safe_load(path.read_text())


def apply_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`dpa.train.lr`) in a nested dict; a missing intermediate key is created."""
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {key!r} is not a section")
        node[leaf] = value
    return doc


def resolve_run_config(params: PipelineParams) -> RunConfig:
    doc = apply_overrides(load_preset(params.preset), params.overrides)
    doc["preset"] = params.preset
    if params.dataset is not None:
        doc["dataset"] = params.dataset.model_dump()
    if params.model_name:
        doc.setdefault("registry", {})["model_name"] = params.model_name
    return RunConfig.model_validate(doc)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}: the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
