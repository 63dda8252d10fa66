"""Iteration-based DPA training with progressive growing, exact resume and a metrics hook.

One iteration is one Adam step on one batch; Adam is re-created at every stage change; the model
kept is the last iterate (dpa_method.md §1.1, §4). Training data stay a uint8 tensor on the
device; batches are drawn, augmented and converted there. All randomness of the loop comes from
one `torch.Generator`, which a checkpoint stores, so "train N, stop, resume, train N" equals
"train 2N".
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model.config import AugmentConfig, DPAConfig
from model.dpa import DPA, to_model_range
from model.perceptual import training_feature_stats
from model.progressive import Stage, stage_schedule

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class StepInfo:
    """What a metrics callback receives every `log_every` iterations (and at the last one)."""

    iteration: int
    total_iterations: int
    stage_index: int
    stage: Stage
    alpha: float | None
    loss: float
    images_per_sec: float


StepCallback = Callable[[StepInfo], None]


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU (bf16 there is slow and changes results)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class BatchSampler:
    """Endless shuffled batches without replacement within an epoch, dropping the last partial batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if n < batch_size:
            raise ValueError(
                f"only {n} training images for batch_size={batch_size}: lower train.batch_size or add normal images"
            )
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


def augment(x: torch.Tensor, size: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop to `size` (else centre crop) and random flips, as batched tensor ops."""
    b, _, h, w = x.shape
    if h > size or w > size:
        if cfg.random_crop:
            top = torch.randint(0, h - size + 1, (b,), generator=generator).to(x.device)
            left = torch.randint(0, w - size + 1, (b,), generator=generator).to(x.device)
            ar = torch.arange(size, device=x.device)
            rows = (top[:, None] + ar)[:, None, :, None]
            cols = (left[:, None] + ar)[:, None, None, :]
            x = x[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
        else:
            top, left = (h - size) // 2, (w - size) // 2
            x = x[..., top : top + size, left : left + size]
    for enabled, dim in ((cfg.hflip, 3), (cfg.vflip, 2)):
        if enabled:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(dim), x)
    return x


class Trainer:
    def __init__(
        self,
        cfg: DPAConfig,
        images: torch.Tensor,
        checkpoint_dir: Path | None = None,
        callbacks: Sequence[StepCallback] = (),
        progress: bool = True,
        dpa: DPA | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != cfg.network.image_channels:
            raise ValueError(
                f"training images must be uint8 N×{cfg.network.image_channels}×H×W, got {images.dtype} {tuple(images.shape)}"
            )
        self.cfg = cfg
        self.device = select_device(cfg.train.device)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.images = images.to(self.device)
        torch.manual_seed(cfg.train.seed)  # before building: the network init must be seeded too
        self.dpa = (dpa or DPA.build(cfg)).to(self.device, memory_format=self.memory_format)
        self.stages = stage_schedule(cfg)
        self.total_iterations = sum(s.iters for s in self.stages)
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        self.progress = progress
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.sampler = BatchSampler(len(images), cfg.train.batch_size, self.generator)
        self.optimizer: torch.optim.Adam | None = None
        self.stage_index = self.step_in_stage = self.iteration = 0
        if not (checkpoint_dir and self._resume()) and self.dpa.feature_stats == "train":
            self._fit_feature_stats()

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def _fit_feature_stats(self) -> None:
        """Batch by batch: the whole set as float could be 4× the uint8 tensor on the device."""
        size = self.cfg.network.max_res
        batches = (to_model_range(augment(b, size, AugmentConfig(), self.generator)) for b in self.images.split(64))
        self.dpa.perceptual.set_stats(training_feature_stats(self.dpa.perceptual, batches))

    def _new_optimizer(self) -> torch.optim.Adam:
        trainable = [p for p in self.dpa.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.cfg.train.lr)

    def _batch(self) -> torch.Tensor:
        idx = self.sampler.next().to(self.device)
        x = augment(self.images[idx], self.cfg.network.max_res, self.cfg.train.augment, self.generator)
        return to_model_range(x).contiguous(memory_format=self.memory_format)

    def _step(self, stage: Stage) -> torch.Tensor:
        if self.optimizer is None:  # a new Adam at every stage, as the reference does
            self.optimizer = self._new_optimizer()
        alpha = stage.alpha(self.step_in_stage)
        with autocast(self.device, self.cfg.train.bf16):
            loss = self.dpa.stage_loss(self._batch(), stage, alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _advance(self, stage: Stage) -> None:
        self.iteration += 1
        self.step_in_stage += 1
        if self.step_in_stage == stage.iters:
            self.stage_index, self.step_in_stage, self.optimizer = self.stage_index + 1, 0, None

    def fit(self, until: int | None = None) -> DPA:
        """Train to the end of the schedule, or up to global iteration `until`, from the current state."""
        self.dpa.train()
        bar = tqdm(total=self.total_iterations, initial=self.iteration, disable=not self.progress, desc="DPA", mininterval=2.0)
        window_start, window_images = time.perf_counter(), 0
        while self.stage_index < len(self.stages) and (until is None or self.iteration < until):
            stage, stage_index = self.stages[self.stage_index], self.stage_index
            alpha = stage.alpha(self.step_in_stage)
            loss = self._step(stage)
            self._advance(stage)
            window_images += self.cfg.train.batch_size
            bar.update(1)
            done = self.stage_index == len(self.stages) or self.iteration == until
            if self.iteration % self.cfg.train.log_every == 0 or done:
                value = float(loss)  # the only host sync of the loop
                speed = window_images / (time.perf_counter() - window_start)
                bar.set_postfix(stage=f"{stage.kind}@{stage.res}", loss=f"{value:.4f}")
                info = StepInfo(self.iteration, self.total_iterations, stage_index, stage, alpha, value, speed)
                for callback in self.callbacks:
                    callback(info)
                window_start, window_images = time.perf_counter(), 0
            every = self.cfg.train.checkpoint_every
            if self.checkpoint_dir and (done or (every and self.iteration % every == 0)):
                self.save_checkpoint()
        bar.close()
        return self.dpa.eval()

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly; written atomically (tmp file + rename)."""
        state = {
            "config": self.cfg.model_dump(mode="json"),
            "dpa": self.dpa.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "position": [self.stage_index, self.step_in_stage, self.iteration],
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state["config"] != self.cfg.model_dump(mode="json"):
            raise ValueError(
                f"{self.checkpoint_path} was written for another configuration; delete it or use another checkpoint_dir"
            )
        self.dpa.load_state_dict(state["dpa"])
        self.stage_index, self.step_in_stage, self.iteration = state["position"]
        if state["optimizer"] is not None:
            self.optimizer = self._new_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict({k: v.cpu() if torch.is_tensor(v) else v for k, v in state["sampler"].items()})
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        return True


def train_dpa(
    cfg: DPAConfig,
    images: torch.Tensor,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
) -> DPA:
    """Train a DPA on uint8 normal images (resuming from `checkpoint_dir` when it holds a checkpoint)."""
    return Trainer(cfg, images, checkpoint_dir, callbacks, progress).fit()
