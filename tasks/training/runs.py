"""Training and evaluating one seed, or several in parallel, each in its MLflow run.

Several seeds run as parallel tasks on the same data, one child run each; the seed to register is
chosen by `select_seed` (never on the test split), and the spread goes on the parent run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient

from tasks.config import RunConfig
from tasks.training.baseline_evaluation import baseline_metrics
from tasks.training.evaluation import ModelEvaluation, evaluate
from tasks.training.preprocessing import PreprocessedDataset
from tasks.training.seeds import SeedCandidate, recent_train_loss, seed_config, seed_list, seed_spread, select_seed
from tasks.training.train import train

if TYPE_CHECKING:
    from model.dpa import DPA


def config_digest(cfg: RunConfig) -> str:
    """Checkpoints are keyed by data version, preprocessing and method: only a rerun of the same
    crashed run resumes from them."""
    key = {"preprocess": cfg.preprocess.model_dump(mode="json"), "dpa": cfg.dpa.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    """One trained and evaluated model, and the MLflow run that holds it."""

    dpa: DPA
    evaluation: ModelEvaluation
    run_id: str
    checkpoints: tuple[Path, ...]
    seeds: dict[str, object] | None = None


def train_one(cfg: RunConfig, data: PreprocessedDataset, data_version: str, project: Path, run_id: str) -> Trained:
    checkpoints = project / ".dpa" / "checkpoints" / data_version / config_digest(cfg)
    dpa = train(cfg.dpa, data.subset(split="train", label="normal").images, checkpoints, run_id)
    return Trained(dpa, evaluate(dpa, data, cfg, data_version, run_id), run_id, (checkpoints,))


def train_seeds(cfg: RunConfig, data: PreprocessedDataset, data_version: str, project: Path, parent: mlflow.ActiveRun) -> Trained:
    """`train.seeds` seeds as parallel tasks on the same data, one child run each; the seed to
    register is chosen by `select_seed` (never the test split); the spread, the chosen seed's
    figures and its model go on the parent run."""
    client, images = MlflowClient(), data.subset(split="train", label="normal").images
    futures = {}
    for seed in seed_list(cfg):
        seed_cfg = seed_config(cfg, seed)
        child = client.create_run(
            parent.info.experiment_id, run_name=f"{parent.info.run_name}-seed{seed}",
            tags={"mlflow.parentRunId": parent.info.run_id, "seed": str(seed), "data_version": data_version},
        ).info.run_id
        checkpoints = project / ".dpa" / "checkpoints" / data_version / config_digest(seed_cfg)
        dpa = train.submit(seed_cfg.dpa, images, checkpoints, child)
        futures[seed] = (dpa, evaluate.submit(dpa, data, seed_cfg, data_version, child), child, checkpoints)
    done = {seed: Trained(d.result(), e.result(), child, (ckpt,)) for seed, (d, e, child, ckpt) in futures.items()}
    for trained in done.values():
        client.set_terminated(trained.run_id)
    chosen, rule = select_seed([
        SeedCandidate(seed, t.evaluation.val_auroc, t.evaluation.val_normal_loss, recent_train_loss(t.run_id))
        for seed, t in done.items()
    ])
    aurocs = {seed: t.evaluation.metrics.auroc for seed, t in done.items()}
    spread = seed_spread(aurocs)
    mlflow.log_metrics({"seed_test_auroc_mean": spread["mean"], "seed_test_auroc_std": spread["std"]}
                       | {f"seed_{seed}_test_auroc": auroc for seed, auroc in aurocs.items()})
    best = done[chosen].evaluation  # the registered model's figures, on the run it is registered in
    mlflow.log_metrics(best.metrics.as_mlflow_metrics() | baseline_metrics(best.baselines))
    mlflow.set_tags({"registered_seed": str(chosen), "seed_rule": rule})
    report = {"per_seed_auroc": aurocs, **spread, "registered_seed": chosen, "rule": rule}
    checkpoints = tuple(c for t in done.values() for c in t.checkpoints)
    return Trained(done[chosen].dpa, best, parent.info.run_id, checkpoints, report)
