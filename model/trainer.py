"""Iteration-based DPA training with progressive growing, exact resume and a metrics hook.

One iteration is one Adam step on one batch; Adam is re-created at every stage change; the model
kept is the last iterate (docs/method.md §1.1, §4). Training data stay a uint8 tensor on the
device; batches are drawn, augmented and converted there. All randomness of the loop comes from
one `torch.Generator`, which a checkpoint stores, so "train N, stop, resume, train N" equals
"train 2N". Inside a torchrun job each rank trains on its share of every batch (model.distributed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model.batches import BatchSampler, apply_augment, augment, is_deterministic
from model.config import AugmentConfig, DPAConfig
from model.cpu_malloc import keep_freed_memory
from model.distributed import World, data_parallel
from model.dpa import DPA, MEMORY_FORMAT, to_model_range
from model.feature_cache import FeatureCache
from model.perceptual import training_feature_stats
from model.progressive import Stage, stage_schedule

CHECKPOINT_NAME = "checkpoint.pt"
MAX_LOSS = 1e6  # the reference stops training above this too
_BUILD_LOCK = threading.RLock()
"""A trainer seeds torch's global RNG, then draws the network's initial weights (and random VGG
weights) from it: trainers built at once in threads (parallel seeds, benchmark cells, trials)
would interleave those draws, and the same seed would give another model."""
log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite or exploded: almost always a learning rate too high."""


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


def seeded_dpa(cfg: DPAConfig) -> DPA:
    """The untrained DPA every run of `cfg` starts from (its init seeded by train.seed), built
    without touching the caller's RNG."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return DPA.build(cfg)


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
        self.world = World.current()
        if self.world.size != cfg.train.nproc_per_node:
            raise ValueError(
                f"train.nproc_per_node={cfg.train.nproc_per_node} but this process is one of {self.world.size}: "
                "with more than one, train through the training task (it starts torchrun), else set it to 1"
            )
        self.device = select_device(cfg.train.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.images = images.to(self.device)
        with _BUILD_LOCK:  # another thread's seeding must not land in the middle of this build
            torch.manual_seed(cfg.train.seed)  # whatever draws from the global RNG starts the same every run
            self.dpa = (dpa or seeded_dpa(cfg)).to(self.device)
        self.stages = stage_schedule(cfg)
        self.total_iterations = sum(s.iters for s in self.stages)
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        self.progress = progress and self.world.is_main
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.sampler = BatchSampler(images.shape, cfg.train.batch_size, cfg.network.max_res, cfg.train.augment,
                                    self.generator, self.device)
        self.optimizer: torch.optim.Adam | None = None
        self.stage_index = self.step_in_stage = self.iteration = 0
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per stage: autotune once
        if not (checkpoint_dir and self._resume()) and self.dpa.feature_stats == "train":
            self._fit_feature_stats()
        cacheable = is_deterministic(cfg.train.augment, images.shape[-1], cfg.network.max_res)
        self.cache = (
            FeatureCache(self.dpa, len(self.images), self._fixed_input, cfg.train.feature_cache_mb, self._autocast)
            if cacheable and cfg.train.feature_cache_mb > 0 else None
        )
        self._alphas: dict[int, torch.Tensor] = {}
        multi_resolution = cfg.initial_res < cfg.network.max_res
        self._eager_loss = data_parallel(self.dpa, multi_resolution) if self.world.joined else self.dpa.stage_loss
        self._compiled_loss = self._compile(self._eager_loss) if cfg.train.compile else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.train.bf16)

    def _compile(self, loss_fn: Callable) -> Callable:
        """torch.compile of the loss, with CUDA graphs on a single GPU (they do not mix with DDP's
        hooks). Each stage compiles its own graph and trainers in one process share the compiled-code
        cache, so every trainer raises the recompile limit by its schedule; past it, dynamo fails
        (and training falls back, logged) instead of running eagerly unseen."""
        dynamo = torch._dynamo.config
        dynamo.recompile_limit += 2 * len(self.stages)
        dynamo.fail_on_recompile_limit_hit = True
        cuda_graphs = self.device.type == "cuda" and not self.world.joined
        return torch.compile(loss_fn, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)

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
        return torch.optim.Adam(trainable, lr=self.cfg.train.lr, fused=self.device.type == "cuda" or None)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: its image indices and the model input."""
        idx, draws = self.sampler.next()
        idx, draws = self.world.share(idx), {k: self.world.share(v) for k, v in draws.items()}
        return idx, self._model_input(self.images[idx], draws)

    def _fixed_input(self, images: slice) -> torch.Tensor:
        """The model input of a range of images whose input is the same at every draw (what the cache holds)."""
        return self._model_input(self.images[images], self.sampler.fixed_draws(images))

    def _model_input(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        x = apply_augment(images, self.cfg.network.max_res, draws)
        return to_model_range(x).contiguous(memory_format=MEMORY_FORMAT)

    def _alpha(self, stage: Stage) -> torch.Tensor | None:
        """α of this step as a device tensor, sliced from the stage's precomputed ramp (no host copy)."""
        if stage.kind == "stab":
            return None
        if stage.iters not in self._alphas:
            ramp = [stage.alpha(i) for i in range(stage.iters)]
            self._alphas = {stage.iters: torch.tensor(ramp, device=self.device)}
        return self._alphas[stage.iters][self.step_in_stage]

    def _cached(self, stage: Stage, idx: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Target features from the cache where the stage's target is α-independent: the stab input,
        and during trns into max_res the smooth loss's R/2 target (↓(fade(↑↓x, x)) = ↓x)."""
        if self.cache is None:
            return {}
        if stage.kind == "stab":
            res = stage.res
        elif stage.res == self.cfg.network.max_res and self.cfg.train.smooth_pg_loss:
            res = stage.res // 2
        else:
            return {}
        features = self.cache.lookup(res, idx)
        return {} if features is None else {res: features}

    def _step(self, stage: Stage) -> torch.Tensor:
        if self.optimizer is None:  # a new Adam at every stage, as the reference does
            self.optimizer = self._new_optimizer()
        idx, x = self._batch()
        inputs = (x, stage, self._alpha(stage), self._cached(stage, idx))
        if self._compiled_loss is None:
            loss = self._backward(self._eager_loss, inputs)
        else:
            loss = self._compiled_backward(inputs)
        self.optimizer.step()
        return loss.detach()

    def _compiled_backward(self, inputs: tuple) -> torch.Tensor:
        """`_backward` through the compiled loss. Where compiling fails in one process, the step is
        redone eagerly from the same batch and the rest of the run stays eager."""
        try:
            torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step may be reused
            return self._backward(self._compiled_loss, inputs)
        except (torch.OutOfMemoryError, torch.AcceleratorError):
            raise  # the device's trouble, not the compiler's: the eager step would meet it too
        except Exception as err:  # noqa: BLE001 - dynamo/inductor raise many types, in forward or in the lazily compiled backward
            if self.world.joined:  # DDP's reducer and the other ranks are mid-step: no rank may redo it alone
                raise RuntimeError(
                    f"train.compile: the compiled step failed on rank {self.world.rank} ({type(err).__name__}: {err}); "
                    "DDP ranks cannot fall back to eager one by one: set train.compile: false"
                ) from err
            log.warning("train.compile: the compiled step failed (%s: %s); this step and the rest run eagerly",
                        type(err).__name__, err)
            self._compiled_loss = None
        return self._backward(self._eager_loss, inputs)

    def _backward(self, loss_fn: Callable, inputs: tuple) -> torch.Tensor:
        """The batch's loss, its gradients left in the parameters' .grad (cleared first, so a failed
        compiled attempt leaves nothing behind)."""
        with self._autocast():
            loss = loss_fn(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

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
                value = float(self.world.mean(loss))  # the only host sync of the loop
                self._check_loss(value, stage)
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

    def _check_loss(self, value: float, stage: Stage) -> None:
        if not math.isfinite(value) or value > MAX_LOSS:
            raise TrainingDiverged(
                f"training diverged: loss={value} at iteration {self.iteration}/{self.total_iterations} "
                f"({stage.kind}@{stage.res}); the likely cause is train.lr={self.cfg.train.lr} being too high "
                "for this data and batch size: lower it (e.g. ÷10)"
            )

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly; written atomically (tmp file + rename), by rank 0
        alone: every rank holds the same state."""
        if not self.world.is_main:
            return
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
