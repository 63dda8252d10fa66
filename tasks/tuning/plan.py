"""What a search will cost, said before it starts, and how far it has come, said after each trial.

The plan is grid points × folds × iteration budget; its time is an upper bound from a short
measured warm-up on this machine: a few training iterations of the most expensive point (the
widest rung, at max_res), timed after one untimed iteration. Early stopping and cheaper
low-resolution stages make the real search shorter, never longer (on an otherwise idle machine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model.config import DPAConfig
from model.progressive import stage_schedule
from model.trainer import Trainer
from tasks.tuning.space import SearchSpace, point_key

WARMUP_ITERS = 3


@dataclass(frozen=True)
class SearchPlan:
    n_trials: int
    n_folds: int
    max_iterations: int
    """The largest iteration budget of one fold of one trial."""
    total_iterations: int
    seconds_per_iteration: float
    workers: int

    @property
    def estimate_seconds(self) -> float:
        """At most this long, if the workers run side by side at the warm-up's speed."""
        return self.total_iterations * self.seconds_per_iteration / self.workers

    def describe(self) -> str:
        return (
            f"plan: {self.n_trials} trials × {self.n_folds} folds × at most {self.max_iterations} iterations "
            f"= {self.total_iterations} iterations; warm-up {self.seconds_per_iteration:.3f} s/iteration → at most "
            f"{format_duration(self.estimate_seconds)} with {self.workers} worker(s) (early stopping usually ends trials sooner)"
        )


def costliest_point(space: SearchSpace) -> dict:
    """The widest rung without progressive growing: every iteration at max_res, the most channels."""
    widest = max(space.ladder, key=lambda rung: (rung.width, rung.latent_dim)).label
    points = [p for p in space.grid() if p["capacity"] == widest]
    return next((p for p in points if not p["progressive"]), points[0])


def measure_seconds_per_iteration(cfg: DPAConfig, images: torch.Tensor, iters: int = WARMUP_ITERS) -> float:
    """Seconds per training iteration of `cfg`'s first stage, after one untimed iteration."""
    trainer = Trainer(cfg, images[: max(2 * cfg.train.batch_size, 1)], progress=False)
    trainer.fit(until=1)
    started = time.perf_counter()
    trainer.fit(until=1 + iters)
    return (time.perf_counter() - started) / iters


def plan_search(space: SearchSpace, configs: dict[str, DPAConfig], n_trials: int, n_folds: int, workers: int,
                images: torch.Tensor) -> SearchPlan:
    budgets = sorted((sum(s.iters for s in stage_schedule(cfg)) for cfg in configs.values()), reverse=True)
    wanted = (budgets * (n_trials // len(budgets) + 1))[:n_trials]  # TPE may revisit points: bound by the largest
    seconds = measure_seconds_per_iteration(configs[point_key(costliest_point(space))], images)
    return SearchPlan(n_trials, n_folds, budgets[0], sum(wanted) * n_folds, seconds, workers)


@dataclass
class Progress:
    """One line per finished trial: done/total, best so far, elapsed and time left."""

    total: int
    already_done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished_here: int = 0

    def line(self, number: int, value: float | None, best: tuple[int, float] | None) -> str:
        self.finished_here += 1
        done = self.already_done + self.finished_here
        elapsed = time.monotonic() - self.started
        left = elapsed / self.finished_here * (self.total - done)
        outcome = "failed" if value is None else f"mean CV AUROC {value:.4f}"
        best_text = f"best so far {best[1]:.4f} (trial {best[0]})" if best else "no complete trial yet"
        return (f"trial {number} {outcome} — {done}/{self.total} done, {best_text}; "
                f"elapsed {format_duration(elapsed)}, about {format_duration(left)} left")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
