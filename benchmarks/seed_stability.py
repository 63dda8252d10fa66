"""How much a trained DPA's test AUROC depends on the training seed, beside the pixel baselines.

Offline tasks, random VGG19 weights (vgg_seed 0, as offline training gets them), the DPA of a
preset (default: the demo's) trained with N seeds per `loss.min_channel_std` value. One row per
task and value: AUROC mean, std, min, max over the seeds; then each baseline's AUROC (PCA and
mean image, which do not depend on the seed). `--split val` scores the validation split instead,
for choosing hyperparameters without looking at the test split.

Tasks:
  demo          the demo preset's phantoms (difficulty 0.2, every anomaly type)
  phantoms_hard phantoms of another seed, difficulty 0.5, nodules and pneumothoraces only
  digits        scikit-learn's handwritten digits (UCI ML digits, shipped with scikit-learn):
                normal = "8" (the digit the pixel baselines find hardest), anomalies = the other
                nine digits; 8×8 upsampled to the preset's size

    python benchmarks/seed_stability.py --seeds 3 --min-channel-std 0 0.01
    python benchmarks/seed_stability.py --tasks demo --split val --override train.stab_iters=1000
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from common import CONFIGS
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from data_layer.manifest import ABNORMAL, LABEL, NORMAL, SPLIT
from data_layer.phantoms import PhantomSpec, generate_phantoms
from data_layer.preprocessing import PreprocessConfig, preprocess_dataset
from model.baselines import fit_baselines
from model.config import DPAConfig
from model.scoring import score_images
from model.trainer import Trainer


@dataclass(frozen=True)
class Task:
    train: torch.Tensor  # uint8 N×C×H×W normal training images
    images: torch.Tensor  # the scored split
    labels: np.ndarray  # 1 = anomaly


def phantom_task(spec: PhantomSpec, preprocess: PreprocessConfig, split: str) -> Task:
    with tempfile.TemporaryDirectory() as tmp:
        data = preprocess_dataset(generate_phantoms(Path(tmp) / "data", spec), preprocess, Path(tmp) / "cache", "bench")
    train = data.subset(split="train", label=NORMAL)
    scored = (data.manifest[SPLIT] == split).to_numpy().copy()
    return Task(train.images, data.images[torch.from_numpy(scored)],
                (data.manifest[LABEL][scored] == ABNORMAL).to_numpy().astype(int))


def digits_task(size: int, split: str, normal_digit: int = 8) -> Task:
    """One seeded split of the digits: half the normals train, a quarter each for val and test;
    the anomalies (other digits) split evenly between val and test, 150 each."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16  # 0..16 gray levels
    images = (F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1) * 255)
    images = images.round().to(torch.uint8)
    rng = np.random.default_rng(0)
    normal = rng.permutation(np.flatnonzero(digits.target == normal_digit))
    other = rng.permutation(np.flatnonzero(digits.target != normal_digit))[:300]
    half, quarter = len(normal) // 2, len(normal) // 4
    parts = {"val": (normal[half : half + quarter], other[:150]), "test": (normal[half + quarter :], other[150:])}
    normals, anomalies = parts[split]
    return Task(images[normal[:half]], images[np.concatenate([normals, anomalies])],
                np.r_[np.zeros(len(normals), int), np.ones(len(anomalies), int)])


def load_task(name: str, preset: dict, split: str) -> Task:
    preprocess = PreprocessConfig.model_validate(preset["preprocess"])
    demo_spec = {k: v for k, v in preset["dataset"].items() if k != "importer"}
    if name == "demo":
        return phantom_task(PhantomSpec(**demo_spec), preprocess, split)
    if name == "phantoms_hard":
        spec = {**demo_spec, "seed": 7, "difficulty": 0.5, "anomaly_types": ("nodule", "pneumothorax")}
        return phantom_task(PhantomSpec(**spec), preprocess, split)
    if name == "digits":
        return digits_task(preprocess.size, split)
    raise ValueError(f"unknown task {name!r}")


def dpa_config(preset: dict, seed: int, min_channel_std: float, overrides: list[str]) -> DPAConfig:
    doc = copy.deepcopy(preset["dpa"])
    doc["loss"].update(vgg_weights="random", min_channel_std=min_channel_std)
    doc["train"].update(seed=seed, log_every=10**9)
    for item in overrides:  # section.key=value, e.g. train.stab_iters=1000
        path, value = item.split("=", 1)
        *parents, key = path.split(".")
        node = doc
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = yaml.safe_load(value)
    return DPAConfig.model_validate(doc)


def seed_aurocs(task: Task, preset: dict, seeds: int, min_channel_std: float, overrides: list[str]) -> list[float]:
    aurocs = []
    for seed in range(seeds):
        cfg = dpa_config(preset, seed, min_channel_std, overrides)
        dpa = Trainer(cfg, task.train, progress=False).fit()
        aurocs.append(roc_auc_score(task.labels, score_images(dpa, task.images, 256).numpy()))
    return aurocs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="the DPA and preprocessing of this preset")
    parser.add_argument("--tasks", nargs="+", default=["demo", "phantoms_hard", "digits"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--min-channel-std", type=float, nargs="+", default=[0.0, 0.01],
                        help="values of loss.min_channel_std to compare (0: every channel kept, as before)")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--override", action="append", default=[], help="DPA config override, e.g. loss.layers={32: {r32: 1.0}}")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = yaml.safe_load((CONFIGS / f"{args.preset}.yaml").read_text())
    print(f"preset={args.preset} split={args.split} seeds={args.seeds} overrides={args.override or '-'}")
    print(f"{'task':<14} {'min_channel_std':>15} {'mean':>6} {'std':>6} {'min':>6} {'max':>6}  per seed | baselines")
    for name in args.tasks:
        task = load_task(name, preset, args.split)
        baselines = fit_baselines(task.train).score(task.images)
        pixel = " ".join(f"{b} {roc_auc_score(task.labels, s):.3f}" for b, s in baselines.items())
        for value in args.min_channel_std:
            a = np.array(seed_aurocs(task, preset, args.seeds, value, args.override))
            print(f"{name:<14} {value:>15g} {a.mean():6.3f} {a.std():6.3f} {a.min():6.3f} {a.max():6.3f}  "
                  f"{' '.join(f'{x:.3f}' for x in a)} | {pixel}", flush=True)


if __name__ == "__main__":
    main()
