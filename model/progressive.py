"""Progressive growing: the stage sequence, the α fade-in and the resized inputs (docs/method.md §1.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from model.config import DPAConfig, resolution_levels
from model.networks import fade


@dataclass(frozen=True)
class Stage:
    kind: Literal["stab", "trns"]
    res: int
    iters: int

    def alpha(self, step_in_stage: int) -> float | None:
        """α before step `step_in_stage` (0-based): α ← min(α + 1/N, 1), so 1/N, 2/N, …, 1. None when stable."""
        if self.kind == "stab":
            return None
        return min((step_in_stage + 1) / self.iters, 1.0)


def stage_schedule(cfg: DPAConfig) -> list[Stage]:
    """stab@init, then trns@2r, stab@2r, … up to stab@max_res. Stages with 0 iterations are dropped."""
    t = cfg.train
    init = cfg.initial_res

    def iters(res: int, kind: str) -> int:
        default = t.stab_iters if kind == "stab" else t.trns_iters
        return t.iters_per_res.get(res, {}).get(kind, default)

    stages = [Stage("stab", init, iters(init, "stab"))]
    for res in resolution_levels(init, cfg.network.max_res)[1:]:
        stages += [Stage("trns", res, iters(res, "trns")), Stage("stab", res, iters(res, "stab"))]
    return [s for s in stages if s.iters > 0]


def downsample(x: torch.Tensor, res: int) -> torch.Tensor:
    """The reference's nn.Upsample(scale_factor=1/k, bilinear): align_corners=False, no antialiasing."""
    if x.shape[-1] == res:
        return x
    return F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=False)


def stage_input(x: torch.Tensor, res: int, alpha: float | None) -> torch.Tensor:
    """Image at max_res → the stage's input: resized, and faded from the half resolution during trns."""
    high = downsample(x, res)
    if alpha is None:
        return high
    low = F.interpolate(downsample(x, res // 2), scale_factor=2, mode="nearest")
    return fade(low, high, alpha)
