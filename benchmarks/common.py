"""Shared helpers of the benchmark scripts: presets and synthetic inputs of the right shape."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from model.config import DPAConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def preset_dpa_config(name: str, **train_overrides) -> DPAConfig:
    """The preset's DPA config at its final stage (no PG: throughput of the max-resolution network),
    with seeded random VGG weights so the benchmark runs offline (the speed does not depend on them)."""
    doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["dpa"]
    doc["loss"] = {**doc["loss"], "vgg_weights": "random"}
    max_res = doc["network"]["max_res"]
    doc["loss"]["layers"] = {max_res: doc["loss"]["layers"][max_res]}
    doc["train"] = {**doc.get("train", {}), "initial_res": None, "iters_per_res": {}, **train_overrides}
    return DPAConfig.model_validate(doc)


def random_images(cfg: DPAConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.network.image_channels, cfg.network.max_res, cfg.network.max_res)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
