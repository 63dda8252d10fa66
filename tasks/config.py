"""The one typed configuration of a pipeline run, and how presets and overrides resolve into it.

A flow takes `PipelineParams` (what a person fills in: a preset name, dotted overrides, the data
source, the registry name); `resolve_run_config` turns it into `RunConfig`, the fully resolved
configuration that every task reads and MLflow logs as params.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_layer.expectations import ValidationRules
from data_layer.preprocessing import PreprocessConfig
from data_layer.versioning import PRODUCTION
from model.config import DPAConfig
from tasks.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


class DataSource(BaseModel):
    """Where the dataset comes from. `dvc` uses a versioned dataset as it is (production `data/` by
    default); the others import first, into a workspace that production never sees until promoted.
    The importer's own options are the extra fields."""

    model_config = ConfigDict(extra="allow")

    importer: Literal["dvc", "phantoms", "folder", "csv", "medmnist", "cifar10", "svhn", "nih", "camelyon16"] = "phantoms"
    workspace: str = Field(
        "", description="importers: the workspace the import is versioned in (datasets/<workspace>; empty: the preset's "
        "name); dvc: the dataset to read (empty: production, data/)",
    )
    promote: bool = Field(
        False, description="importers: also make the imported version the production dataset (data/) that scheduled "
        "retraining reads",
    )

    def workspace_for(self, preset: str) -> str:
        """Where this source's data are versioned: the production dataset or a workspace."""
        if self.importer == "dvc":
            return self.workspace or PRODUCTION
        return self.workspace or preset


def _source(importer: str, title: str, doc: str) -> type[DataSource]:
    """One named variant of the run form's data-source choice; its options are the importer's arguments."""
    return type(f"{importer.capitalize()}Source", (DataSource,), {
        "__doc__": doc, "__annotations__": {"importer": Literal[importer]}, "importer": importer,
        "model_config": ConfigDict(extra="allow", title=title),
    })


SOURCES = [
    _source("dvc", "DVC-versioned data", "A DVC-versioned dataset of the project: production data/ by default, or a "
            "workspace (pulled from the remote when missing)."),
    _source("phantoms", "Synthetic phantoms", "Synthetic chest X-ray phantoms; options: PhantomSpec fields (n_train_normal, size, seed, ...)."),
    _source("folder", "Image folder", "normal/ and abnormal/<type>/ folders; options: source (the folder), salt, seed."),
    _source("csv", "CSV manifest", "An existing CSV; options: csv_path and its column names."),
    _source("medmnist", "MedMNIST", "A MedMNIST .npz (e.g. PneumoniaMNIST); options: npz_path."),
    _source("cifar10", "CIFAR-10 one-vs-rest", "CIFAR-10 from a local torchvision copy; options: root, normal_class."),
    _source("svhn", "SVHN one-vs-rest", "SVHN from a local torchvision copy; options: root, normal_class."),
    _source("nih", "NIH ChestX-ray14", "A local NIH ChestX-ray14 download; options: root, view."),
    _source("camelyon16", "Camelyon16 patches", "Local Camelyon16 patches; options: root."),
]
DataSourceChoice = Union[tuple(SOURCES)]  # a plain union: the UI shows one titled button per variant (a oneOf inside anyOf renders untitled)


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(
        "", description="registered model name, one per task; empty: dpa-<preset>. Versions of another preset are refused"
    )
    allow_other_presets: bool = Field(
        False, description="register into a model whose versions came from another preset (they are one task)"
    )
    promotion_margin: float = Field(
        0.0, description="superiority gate: the AUROC difference must be significantly above this (H0: difference ≤ margin)"
    )
    auroc_floor: float = Field(0.6, description="never promote a model whose test AUROC is below this")
    gate: Literal["superiority", "non_inferiority"] = Field(
        "superiority",
        description="superiority: promote when the challenger's AUROC is significantly above the champion's "
        "(by more than promotion_margin); non_inferiority: when it is significantly above champion − non_inferiority_margin",
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided significance level of the paired tests (clustered by patient)")
    beat_baseline: bool = Field(
        True,
        description="promote only a challenger that beats the best pixel baseline (PCA, mean image) on the same test "
        "images: a one-sided paired test at alpha, H0: AUROC difference ≤ 0",
    )
    non_inferiority_margin: float = Field(0.02, ge=0, description="AUROC loss tolerated by the non_inferiority gate")
    threshold_quantile: float = Field(
        0.95, description="operating threshold = this quantile of the scores of normal validation images"
    )


class PublishedFigure(BaseModel):
    """The test AUROC a preset's setting has in the literature, with the source named: the benchmark
    table prints it beside the reproduced figure. Only figures that can be sourced are given."""

    model_config = ConfigDict(extra="forbid")

    test_auroc: float = Field(ge=0.0, le=1.0)
    source: str = Field(min_length=1, description="where the figure is printed, and how sure the attribution is")


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
    paper: PublishedFigure | None = Field(None, description="the published figure for this setting, if one can be sourced")

    @model_validator(mode="after")
    def _model_name_of_the_preset(self) -> RunConfig:
        """One registered model per task: without a name, the preset names it."""
        if not self.registry.model_name:
            self.registry.model_name = f"dpa-{self.preset}"
        return self

    @model_validator(mode="after")
    def _images_fit_the_network(self) -> RunConfig:
        """Caught here, before any data are imported or decoded, rather than at training start."""
        net = self.dpa.network
        if self.preprocess.channels != net.image_channels:
            raise ValueError(f"preprocess.channels={self.preprocess.channels} but dpa.network.image_channels={net.image_channels}")
        if self.preprocess.size < net.max_res:
            raise ValueError(f"preprocess.size={self.preprocess.size} is below dpa.network.max_res={net.max_res}")
        return self


OVERRIDES_EXAMPLE = {"dpa.train.stab_iters": 500, "dpa.train.lr": 0.0005, "dataset.n_train_normal": 400}


class PipelineParams(BaseModel):
    """What a person chooses when starting a run (the Prefect UI form, the CLI flags). A wrong preset
    or override key is refused here, before any data are touched."""

    preset: str = Field("demo", description="a preset in configs/", json_schema_extra={"enum": PRESETS})
    overrides: dict[str, Any] = Field(
        default_factory=dict, examples=[OVERRIDES_EXAMPLE],
        description=f"dotted keys into the preset and their values, e.g. {json.dumps(OVERRIDES_EXAMPLE)}",
    )
    dataset: DataSourceChoice | None = Field(None, description="data source; default: the preset's")
    model_name: str | None = Field(None, description="registered model name; default: the preset's registry.model_name")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        return preset

    @field_validator("dataset", mode="before")
    @classmethod
    def _source_as_dict(cls, value: Any) -> Any:
        return value.model_dump() if isinstance(value, DataSource) else value

    @model_validator(mode="after")
    def _overrides_resolve(self) -> PipelineParams:
        try:
            resolve_run_config(self)
        except ValidationError as error:
            unknown = [".".join(map(str, e["loc"])) for e in error.errors() if e["type"] == "extra_forbidden"]
            if unknown:
                raise ValueError(f"unknown override key(s) {', '.join(unknown)}: no such setting in preset {self.preset!r}") from None
            raise ValueError(f"preset {self.preset!r} with these overrides is not a valid configuration: {error}") from None
        return self


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


def model_name_of(preset: str) -> str:
    """The registered model a preset trains into (its `registry.model_name`, else dpa-<preset>)."""
    return resolve_run_config(PipelineParams(preset=preset)).registry.model_name


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
