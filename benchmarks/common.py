"""Shared helpers of the benchmark scripts: presets and synthetic inputs of the right shape."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_layer.preprocessing import PreprocessConfig
from model.config import DPAConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _preset(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def preset_dpa_config(name: str, stage: str = "stab", layer: str | None = None, **train_overrides) -> DPAConfig:
    """The preset's DPA config at one stage of max resolution, with seeded random VGG weights so the
    benchmark runs offline (the speed does not depend on them).

    stage="stab": the max-resolution network alone (no PG); "trns": only the transition into
    max_res (α fade and the smooth loss at R/2). `layer` replaces the loss layers (weight 1).
    `train_overrides["iters"]` sets the length of that one stage.
    """
    doc = _preset(name)["dpa"]
    max_res = doc["network"]["max_res"]
    iters = train_overrides.pop("iters", 10)
    keep = [max_res] if stage == "stab" else [max_res // 2, max_res]
    layers = {r: ({layer: 1.0} if layer else doc["loss"]["layers"][r]) for r in keep}
    doc["loss"] = {**doc["loss"], "vgg_weights": "random", "layers": layers}
    schedule = {"initial_res": None, "iters_per_res": {}, "stab_iters": iters}
    if stage == "trns":
        schedule = {"initial_res": max_res // 2, "stab_iters": 0, "trns_iters": iters, "iters_per_res": {}}
    doc["train"] = {**doc.get("train", {}), **schedule, **train_overrides}
    return DPAConfig.model_validate(doc)


def preset_serving_config(name: str) -> tuple[DPAConfig, PreprocessConfig]:
    """The preset's DPA (all resolutions, its loss layers) and preprocessing, with seeded random VGG
    weights: what a registered model of the preset serves, offline (speed does not depend on weights)."""
    doc = _preset(name)
    dpa = {**doc["dpa"], "loss": {**doc["dpa"]["loss"], "vgg_weights": "random"}}
    return DPAConfig.model_validate(dpa), PreprocessConfig.model_validate(doc["preprocess"])


def stored_res(name: str) -> int:
    """The resolution the preset's images are stored at (Camelyon16: 192, random-cropped to 64)."""
    return int(_preset(name)["preprocess"]["size"])


def random_images(cfg: DPAConfig, n: int, seed: int = 0, res: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    res = res or cfg.network.max_res
    shape = (n, cfg.network.image_channels, res, res)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
