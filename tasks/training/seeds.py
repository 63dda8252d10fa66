"""Several training seeds of one configuration: the spread a single figure hides, and which seed
to register by a rule that never reads the test split.

The rule sees only what `SeedCandidate` carries (validation AUROC, final training loss), so a
test score cannot leak into the choice by construction.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from mlflow import MlflowClient

from tasks.config import RunConfig

RULE_VAL = "highest validation AUROC (the validation split has anomalies)"
RULE_LOSS = "lowest final training loss (the validation split has no anomalies)"


@dataclass(frozen=True)
class SeedCandidate:
    """What the registration rule may look at: nothing from the test split."""

    seed: int
    val_auroc: float | None
    final_train_loss: float


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run configuration with one training seed (and `seeds` back to 1: one model)."""
    train = cfg.dpa.train.model_copy(update={"seed": seed, "seeds": 1})
    return cfg.model_copy(update={"dpa": cfg.dpa.model_copy(update={"train": train})})


def seed_list(cfg: RunConfig) -> list[int]:
    """train.seed, train.seed + 1, …: `train.seeds` of them."""
    return [cfg.dpa.train.seed + i for i in range(cfg.dpa.train.seeds)]


def select_seed(candidates: list[SeedCandidate]) -> tuple[int, str]:
    """The seed to register and the rule in words: validation AUROC when every seed has one,
    else the lowest final training loss (ties: the first seed)."""
    if not candidates:
        raise ValueError("no trained seeds to choose from")
    if all(c.val_auroc is not None for c in candidates):
        return max(candidates, key=lambda c: c.val_auroc).seed, RULE_VAL
    return min(candidates, key=lambda c: c.final_train_loss).seed, RULE_LOSS


def final_train_loss(run_id: str) -> float:
    """The last training loss the run logged (the trainer logs every `log_every` iterations)."""
    history = MlflowClient().get_metric_history(run_id, "train_loss")
    if not history:
        raise ValueError(f"run {run_id} logged no train_loss; cannot apply the lowest-loss rule")
    return float(max(history, key=lambda m: m.step).value)


def seed_spread(aurocs: dict[int, float]) -> dict[str, float]:
    """Mean and sample standard deviation of the test AUROC over seeds (reported, never used to choose)."""
    values = list(aurocs.values())
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
