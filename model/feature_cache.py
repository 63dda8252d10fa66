"""The input's VGG features for the whole training set, computed once per resolution.

Where the training input of an image is the same every time it is drawn (no random crop or flip,
or `augment.frozen`: one seeded crop/flip per image), the target side of the perceptual loss is a
pure function of the image index: caching it turns the VGG work of a step into the x̂ side alone.
Features are kept raw, in the dtype the step's pass produces (bf16 under autocast), so a lookup
returns exactly what the no-graph pass would compute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from model.dpa import DPA
from model.progressive import downsample

log = logging.getLogger(__name__)


class FeatureCache:
    """One resolution at a time: stab@r uses r, and the following trns@2r's smooth loss reuses it."""

    def __init__(self, dpa: DPA, n_images: int, inputs: Callable[[slice], torch.Tensor], budget_mb: int, autocast,
                 chunk: int = 256):
        """`inputs(images)`: the max_res training input of a range of images, the same at every draw."""
        self.dpa, self.n_images, self.inputs, self.budget_bytes = dpa, n_images, inputs, budget_mb * 2**20
        self.autocast, self.chunk = autocast, chunk
        self.res: int | None = None
        self.features: dict[str, torch.Tensor] | None = None
        self.refused: set[int] = set()

    @torch.no_grad()
    def _features(self, images: slice, res: int) -> dict[str, torch.Tensor]:
        layers = list(self.dpa.cfg.loss.layers_at(res))
        with self.autocast():
            return self.dpa.perceptual.target_features(downsample(self.inputs(images), res), layers)

    def _build(self, res: int) -> bool:
        self.features, self.res = None, None  # free the previous resolution first
        probe = self._features(slice(0, 1), res)
        need = self.n_images * sum(f.numel() * f.element_size() for f in probe.values())
        if need > self.budget_bytes:
            log.warning(
                "feature cache at %d×%d needs %.0f MiB > train.feature_cache_mb=%d: using a no-graph VGG pass per step",
                res, res, need / 2**20, self.budget_bytes // 2**20,
            )
            self.refused.add(res)
            return False
        out = {l: f.new_empty((self.n_images, *f.shape[1:])) for l, f in probe.items()}
        for start in range(0, self.n_images, self.chunk):
            for l, f in self._features(slice(start, start + self.chunk), res).items():
                out[l][start : start + len(f)] = f
        self.features, self.res = out, res
        log.info("feature cache at %d×%d: %.0f MiB for %d images", res, res, need / 2**20, self.n_images)
        return True

    def lookup(self, res: int, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Raw target features of images `idx` at `res`, or None when over budget."""
        if res in self.refused:
            return None
        if self.res != res and not self._build(res):
            return None
        return {l: f[idx] for l, f in self.features.items()}
