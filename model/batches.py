"""Training batches: per-epoch shuffles and augmentation draws, made once per epoch and moved to
the device in one copy, so a step draws nothing on the host and makes no host↔device transfer.

All draws come from one CPU `torch.Generator` in a fixed order, and the epoch's plan is part of
the sampler state, so a checkpoint resumes the exact stream. With `augment.frozen` each image's
crop and flips are drawn once, first, from that generator (so a resume re-derives them) and every
epoch reuses them.
"""

from __future__ import annotations

import torch

from model.config import AugmentConfig


def is_deterministic(cfg: AugmentConfig, stored_res: int, size: int) -> bool:
    """Whether an image's training input is the same every time it is drawn (frozen draws, or no random crop or flip)."""
    return cfg.frozen or not (cfg.hflip or cfg.vflip or (cfg.random_crop and stored_res > size))


def draw_augment(n: int, h: int, w: int, size: int, cfg: AugmentConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample crop offsets and flip flags for n images (only the draws the config needs)."""
    draws: dict[str, torch.Tensor] = {}
    if cfg.random_crop and (h > size or w > size):
        draws["top"] = torch.randint(0, h - size + 1, (n,), generator=generator)
        draws["left"] = torch.randint(0, w - size + 1, (n,), generator=generator)
    for name, enabled in (("hflip", cfg.hflip), ("vflip", cfg.vflip)):
        if enabled:
            draws[name] = torch.rand(n, generator=generator) < 0.5
    return draws


def apply_augment(x: torch.Tensor, size: int, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Crop to `size` (random where `draws` has offsets, else centred) and flip, as batched tensor ops."""
    b, c, h, w = x.shape
    if "top" in draws:
        ar = torch.arange(size, device=x.device)
        rows = (draws["top"][:, None] + ar)[:, None, :, None]
        cols = (draws["left"][:, None] + ar)[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        x = x[batch, torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    elif h > size or w > size:
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top : top + size, left : left + size]
    for name, dim in (("hflip", 3), ("vflip", 2)):
        if name in draws:
            x = torch.where(draws[name].view(b, 1, 1, 1), x.flip(dim), x)
    return x


def augment(x: torch.Tensor, size: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop to `size` (else centre crop) and random flips."""
    draws = draw_augment(x.shape[0], x.shape[-2], x.shape[-1], size, cfg, generator)
    return apply_augment(x, size, {k: v.to(x.device) for k, v in draws.items()})


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: on CUDA through pinned memory and an async
    copy (a pageable copy blocks the host until the GPU has drained its queue)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class BatchSampler:
    """Endless shuffled batches without replacement within an epoch (last partial batch dropped),
    each with its augmentation draws; everything a batch needs is a slice of device tensors."""

    def __init__(self, images_shape: torch.Size, batch_size: int, size: int, augment_cfg: AugmentConfig,
                 generator: torch.Generator, device: torch.device):
        n = images_shape[0]
        if n < batch_size:
            raise ValueError(
                f"only {n} training images for batch_size={batch_size}: lower train.batch_size or add normal images"
            )
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.h, self.w, self.size, self.augment_cfg = images_shape[-2], images_shape[-1], size, augment_cfg
        self.frozen = self._draw_augment() if augment_cfg.frozen else None
        self._set_plan(self._draw_plan(), 0)

    def fixed_draws(self, images: slice) -> dict[str, torch.Tensor]:
        """The frozen draws of a range of images, on the device (none where the input is not augmented)."""
        return {} if self.frozen is None else {k: v[images].to(self.device) for k, v in self.frozen.items()}

    def _draw_augment(self) -> dict[str, torch.Tensor]:
        return draw_augment(self.n, self.h, self.w, self.size, self.augment_cfg, self.generator)

    def _draw_plan(self) -> dict[str, torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.generator)
        per_image = self._draw_augment() if self.frozen is None else {k: v[perm] for k, v in self.frozen.items()}
        return {"perm": perm, **per_image}

    def _set_plan(self, plan: dict[str, torch.Tensor], pos: int) -> None:
        self.plan, self.pos = plan, pos
        self.device_plan = {k: to_device(v, self.device) for k, v in plan.items()}

    def next(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(indices, augmentation draws) of the next batch, on the device."""
        if self.pos + self.batch_size > self.n:
            self._set_plan(self._draw_plan(), 0)
        sl = slice(self.pos, self.pos + self.batch_size)
        self.pos += self.batch_size
        draws = {k: v[sl] for k, v in self.device_plan.items()}
        return draws.pop("perm"), draws

    def state_dict(self) -> dict:
        return {"plan": self.plan, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if "plan" not in state:
            raise ValueError("checkpoint written by an older trainer (no batch plan); delete it to start over")
        self._set_plan({k: v.cpu() for k, v in state["plan"].items()}, int(state["pos"]))
