"""What the search varies: the capacity/lr ladder, the VGG loss layers and progressive growing.

A grid point is one ladder rung × VGG layers × progressive growing. The space is read from
configs/search_spaces/ (plus dotted overrides) and turned into the dotted overrides of the base
run config, so every grid point is resolved exactly as the training flow would resolve it, before
any data work. `point_key` names a point stably across trials and restarts.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import CategoricalDistribution
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.config import DPAConfig, canonical_layer, resolution_levels
from tasks.config import CONFIG_DIR, PipelineParams, RunConfig, apply_overrides, resolve_run_config

SEARCH_SPACE_DIR = CONFIG_DIR / "search_spaces"


class Rung(BaseModel):
    """One step of the capacity/lr ladder: bottleneck d, width at every resolution, Adam lr."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_dim: int = Field(ge=1)
    width: int = Field(ge=1)
    lr: float = Field(gt=0)

    @property
    def label(self) -> str:
        """The rung as one categorical value (grid values must be str/int/float/bool/None)."""
        return f"d{self.latent_dim}-w{self.width}-lr{self.lr:g}"


class ProgressiveSchedule(BaseModel):
    """Stages below max_res when progressive growing is on; they are not searched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_res: int = 8
    stab_iters: int = Field(ge=1)
    trns_iters: int = Field(ge=1)
    layers: dict[int, dict[str, float]] = Field(description="loss layers per resolution below max_res")


class EarlyStopping(BaseModel):
    """Validation AUROC every `val_every` iterations of the last stage; stop after `patience`
    evaluations without an improvement above `min_delta` (smaller gains neither reset the
    patience nor move the best point)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_every: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)


class SearchSpace(BaseModel):
    """What the search varies (see configs/search_spaces/ladder.yaml for the meaning of each key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ladder: list[Rung] = Field(min_length=1)
    vgg_layers: list[list[str]] = Field(min_length=1)
    progressive: list[bool] = Field([False], min_length=1)
    pg: ProgressiveSchedule
    max_iters: int = Field(ge=1)
    val_every: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        labels = [rung.label for rung in self.ladder]
        if len(set(labels)) != len(labels):
            raise ValueError(f"ladder rungs must differ: {labels}")
        for layers in self.vgg_layers:
            if not layers:
                raise ValueError("an entry of vgg_layers is empty")
            for layer in layers:
                canonical_layer(layer)
        return self

    @property
    def stopping(self) -> EarlyStopping:
        return EarlyStopping(val_every=self.val_every, patience=self.patience, min_delta=self.min_delta)

    def choices(self) -> dict[str, list[Any]]:
        """Optuna parameter name → categorical values; their product is the grid."""
        return {
            "capacity": [rung.label for rung in self.ladder],
            "vgg_layers": ["+".join(canonical_layer(layer) for layer in layers) for layers in self.vgg_layers],
            "progressive": list(self.progressive),
        }

    def distributions(self) -> dict[str, CategoricalDistribution]:
        return {name: CategoricalDistribution(values) for name, values in self.choices().items()}

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the search space, in a fixed order."""
        names, values = zip(*self.choices().items())
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def overrides(self, point: dict[str, Any], cfg: RunConfig, last_stage_iters: int | None = None) -> dict[str, Any]:
        """Dotted overrides (tasks.config.apply_overrides) that turn the base config into `point`'s.

        `last_stage_iters` replaces the budget: the tuned config trains that many iterations at max_res.
        """
        rung = {r.label: r for r in self.ladder}[point["capacity"]]
        network = cfg.dpa.network
        widths = {res: rung.width for res in resolution_levels(network.first_res, network.max_res)}
        top = {canonical_layer(layer): 1.0 for layer in point["vgg_layers"].split("+")}
        iters = last_stage_iters or self.max_iters
        out: dict[str, Any] = {
            "dpa.network.latent_dim": rung.latent_dim,
            "dpa.network.enc_channels": widths,
            "dpa.network.dec_channels": widths,
            "dpa.train.lr": rung.lr,
        }
        if not point["progressive"]:
            return out | {
                "dpa.train.initial_res": None,
                "dpa.train.stab_iters": iters,
                "dpa.train.iters_per_res": {},
                "dpa.loss.layers": {network.max_res: top},
            }
        lower = resolution_levels(self.pg.initial_res, network.max_res)[:-1]
        missing = [res for res in lower if res not in self.pg.layers]
        if missing:
            raise ValueError(f"pg.layers lacks resolutions {missing} (progressive growing from {self.pg.initial_res})")
        return out | {
            "dpa.train.initial_res": self.pg.initial_res,
            "dpa.train.stab_iters": self.pg.stab_iters,
            "dpa.train.trns_iters": self.pg.trns_iters,
            "dpa.train.iters_per_res": {network.max_res: {"stab": iters}},
            "dpa.loss.layers": {**{res: self.pg.layers[res] for res in lower}, network.max_res: top},
        }


def load_search_space(name: str = "ladder", overrides: dict[str, Any] | None = None) -> SearchSpace:
    """A file in configs/search_spaces/ (by stem) or a path, plus dotted overrides."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SEARCH_SPACE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml")))
        raise ValueError(f"unknown search space {name!r}; known: {known}, or a path to a .yaml file")
    return SearchSpace.model_validate(apply_overrides(yaml.safe_load(path.read_text()), overrides or {}))


def point_key(point: dict[str, Any]) -> str:
    """A point as a stable string: two trials with the same key trained the same configuration."""
    return json.dumps(point, sort_keys=True)


def trial_configs(params: PipelineParams, space: SearchSpace, cfg: RunConfig) -> dict[str, DPAConfig]:
    """Every grid point's method config, resolved exactly as the training flow would, before any
    data work: a point the model rejects fails the search now, not hours in."""
    configs = {}
    for point in space.grid():
        overrides = {**params.overrides, **space.overrides(point, cfg)}
        try:
            configs[point_key(point)] = resolve_run_config(params.model_copy(update={"overrides": overrides})).dpa
        except ValueError as exc:
            raise ValueError(f"search point {point} gives an invalid config: {exc}") from exc
    return configs
