"""The input's VGG features for the whole training set, computed once per resolution.

Where the training input of an image is the same every time it is drawn, the target side of the
perceptual loss is a pure function of the image index: caching it turns the VGG work of a step
into the x̂ side alone. Features are kept raw, in the dtype the step's pass produces (bf16 under
autocast), so a lookup returns exactly what the no-graph pass would compute.
"""

from __future__ import annotations

import logging

import torch

from model.dpa import DPA, to_model_range
from model.progressive import downsample

log = logging.getLogger(__name__)


class FeatureCache:
    """One resolution at a time: stab@r uses r, and the following trns@2r's smooth loss reuses it."""

    def __init__(self, dpa: DPA, images: torch.Tensor, budget_mb: int, autocast, chunk: int = 256):
        self.dpa, self.images, self.budget_bytes = dpa, images, budget_mb * 2**20
        self.autocast, self.chunk = autocast, chunk
        self.res: int | None = None
        self.features: dict[str, torch.Tensor] | None = None
        self.refused: set[int] = set()

    def _inputs(self, batch: torch.Tensor, res: int) -> torch.Tensor:
        max_res = self.dpa.max_res
        top, left = (batch.shape[-2] - max_res) // 2, (batch.shape[-1] - max_res) // 2
        x = to_model_range(batch[..., top : top + max_res, left : left + max_res])
        return downsample(x, res)

    @torch.no_grad()
    def _features(self, batch: torch.Tensor, res: int) -> dict[str, torch.Tensor]:
        layers = list(self.dpa.cfg.loss.layers_at(res))
        with self.autocast():
            return self.dpa.perceptual.target_features(self._inputs(batch, res), layers)

    def _build(self, res: int) -> bool:
        self.features, self.res = None, None  # free the previous resolution first
        probe = self._features(self.images[:1], res)
        need = len(self.images) * sum(f.numel() * f.element_size() for f in probe.values())
        if need > self.budget_bytes:
            log.warning(
                "feature cache at %d×%d needs %.0f MiB > train.feature_cache_mb=%d: using a no-graph VGG pass per step",
                res, res, need / 2**20, self.budget_bytes // 2**20,
            )
            self.refused.add(res)
            return False
        out = {l: f.new_empty((len(self.images), *f.shape[1:])) for l, f in probe.items()}
        for start in range(0, len(self.images), self.chunk):
            for l, f in self._features(self.images[start : start + self.chunk], res).items():
                out[l][start : start + len(f)] = f
        self.features, self.res = out, res
        log.info("feature cache at %d×%d: %.0f MiB for %d images", res, res, need / 2**20, len(self.images))
        return True

    def lookup(self, res: int, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Raw target features of images `idx` at `res`, or None when over budget."""
        if res in self.refused:
            return None
        if self.res != res and not self._build(res):
            return None
        return {l: f[idx] for l, f in self.features.items()}
