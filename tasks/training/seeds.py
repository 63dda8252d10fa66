"""Several training seeds of one configuration: the spread a single figure hides, and which seed
to register by a rule that never reads the test split.

The rule sees only what `SeedCandidate` carries (validation AUROC, the mean loss of held-out normal
validation images, the mean training loss of the last logged steps), so a test score cannot leak
into the choice by construction. The last minibatch's loss alone would compare noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from mlflow import MlflowClient

from tasks.config import RunConfig

RULE_VAL = "highest validation AUROC (the validation split has anomalies)"
RULE_HELD_OUT = "lowest mean loss of the held-out normal validation images (the validation split has no anomalies)"
RULE_LOSS = "lowest mean training loss over the last logged steps (no validation images)"
RECENT_STEPS = 10
"""How many of the last logged training losses the fallback rule averages."""


@dataclass(frozen=True)
class SeedCandidate:
    """What the registration rule may look at: nothing from the test split."""

    seed: int
    val_auroc: float | None
    val_normal_loss: float | None
    recent_train_loss: float


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run configuration with one training seed (and `seeds` back to 1: one model)."""
    train = cfg.dpa.train.model_copy(update={"seed": seed, "seeds": 1})
    return cfg.model_copy(update={"dpa": cfg.dpa.model_copy(update={"train": train})})


def seed_list(cfg: RunConfig) -> list[int]:
    """train.seed, train.seed + 1, …: `train.seeds` of them."""
    return [cfg.dpa.train.seed + i for i in range(cfg.dpa.train.seeds)]


def select_seed(candidates: list[SeedCandidate]) -> tuple[int, str]:
    """The seed to register and the rule in words: validation AUROC when every seed has one, else
    the held-out normal validation loss, else the recent training loss (ties: the first seed)."""
    if not candidates:
        raise ValueError("no trained seeds to choose from")
    if all(c.val_auroc is not None for c in candidates):
        return max(candidates, key=lambda c: c.val_auroc).seed, RULE_VAL
    if all(c.val_normal_loss is not None for c in candidates):
        return min(candidates, key=lambda c: c.val_normal_loss).seed, RULE_HELD_OUT
    return min(candidates, key=lambda c: c.recent_train_loss).seed, RULE_LOSS


def recent_train_loss(run_id: str, steps: int = RECENT_STEPS) -> float:
    """The mean of the last `steps` training losses the run logged (every `log_every` iterations)."""
    history = sorted(MlflowClient().get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    if not history:
        raise ValueError(f"run {run_id} logged no train_loss; cannot apply the training-loss rule")
    return statistics.fmean(m.value for m in history[-steps:])


def seed_spread(aurocs: dict[int, float]) -> dict[str, float]:
    """Mean and sample standard deviation of the test AUROC over seeds (reported, never used to choose)."""
    values = list(aurocs.values())
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
