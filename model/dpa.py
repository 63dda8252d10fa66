"""The Deep Perceptual Autoencoder: encoder + decoder + the frozen perceptual loss that scores it.

The anomaly score of an image is the training loss itself at the final stage (docs/method.md §5),
so one module holds all three and a saved DPA is self-contained (the truncated VGG19 weights and
feature statistics travel in its state_dict).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.config import DPAConfig, resolution_levels
from model.networks import Decoder, Encoder, fade
from model.perceptual import (
    RelativePerceptualLoss,
    VGGSource,
    bare_vgg19_features,
    load_vgg_features,
    reference_feature_stats,
    resolve_feature_stats,
)
from model.progressive import Stage, downsample, stage_input

FORMAT_VERSION = 1
MEMORY_FORMAT = torch.channels_last
"""Of the weights and of the images fed in, on every device: CUDA's tensor cores want it, and on CPU
mkldnn runs a whole training step ~1.2× faster than in NCHW (benchmarks/train_throughput.py)."""


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] images → float [-1,1] (Normalize(0.5, 0.5) of the reference); floats pass through."""
    return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


class DPA(nn.Module):
    def __init__(self, cfg: DPAConfig, vgg: VGGSource):
        super().__init__()
        self.cfg = cfg
        self.vgg_source = vgg.description
        self.encoder = Encoder(cfg.network, cfg.initial_res)
        self.decoder = Decoder(cfg.network, cfg.initial_res)
        layers = {l for res in resolution_levels(cfg.initial_res, cfg.network.max_res) for l in cfg.loss.layers_at(res)}
        self.perceptual = RelativePerceptualLoss(vgg.features, sorted(layers), cfg.loss.min_channel_std)
        self.feature_stats = resolve_feature_stats(cfg.loss.feature_stats, vgg.description)
        if self.feature_stats == "imagenet":
            self.perceptual.set_stats(reference_feature_stats(self.perceptual.layers))
        self.to(memory_format=MEMORY_FORMAT)

    @classmethod
    def build(cls, cfg: DPAConfig) -> DPA:
        """A fresh, untrained DPA with the VGG19 weights named by `cfg.loss.vgg_weights`."""
        return cls(cfg, load_vgg_features(cfg.loss.vgg_weights, cfg.loss.vgg_seed))

    @property
    def max_res(self) -> int:
        return self.cfg.network.max_res

    def reconstruct(self, x: torch.Tensor, res: int | None = None, alpha: float | None = None) -> torch.Tensor:
        res = res or self.max_res
        return self.decoder(self.encoder(x, res, alpha), res, alpha)

    def stage_loss(
        self,
        x: torch.Tensor,
        stage: Stage,
        alpha: float | torch.Tensor | None,
        cached: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Batch-mean training loss for one PG stage; `x` is a [-1,1] batch at max_res.

        The target features of the input come from `cached[res]` (raw VGG features of this batch's
        target at that resolution) when given, else from a pass without autograd.
        """
        cached = cached or {}
        x_res = stage_input(x, stage.res, alpha)
        x_hat = self.reconstruct(x_res, stage.res, alpha)
        loss = self._relative(x_res, x_hat, stage.res, cached)
        if alpha is not None and self.cfg.train.smooth_pg_loss:
            half = stage.res // 2
            low = self._relative(downsample(x_res, half), downsample(x_hat, half), half, cached)
            loss = fade(low, loss, alpha)
        return loss.mean()

    def _relative(
        self, target: torch.Tensor, x_hat: torch.Tensor, res: int, cached: dict[int, dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        weights = self.cfg.loss.layers_at(res)
        features = cached.get(res)
        if features is None:
            features = self.perceptual.target_features(target, list(weights))
        return self.perceptual.relative_to_target(features, x_hat, weights)

    def _final_input(self, x: torch.Tensor) -> torch.Tensor:
        """Test images larger than max_res are centre-cropped (Camelyon16: 64 of 192)."""
        x = to_model_range(x)
        return center_crop(x, self.max_res) if x.shape[-1] > self.max_res else x

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image anomaly score: the final-stage loss with no reduction."""
        x = self._final_input(x)
        return self.perceptual(x, self.reconstruct(x), self.cfg.loss.layers_at(self.max_res))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly map (B×H×W) at max_res."""
        x = self._final_input(x)
        return self.perceptual.anomaly_map(x, self.reconstruct(x), self.cfg.loss.layers_at(self.max_res))

    def score_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`score` and `anomaly_map` with one reconstruction and one VGG pass."""
        x = self._final_input(x)
        return self.perceptual.score_and_map(x, self.reconstruct(x), self.cfg.loss.layers_at(self.max_res))


def save_dpa(dpa: DPA, path: Path) -> None:
    """Plain tensors + JSON-able metadata, so `torch.load(weights_only=True)` can read it back."""
    payload = {
        "format_version": FORMAT_VERSION,
        "config": dpa.cfg.model_dump(mode="json"),
        "vgg_source": dpa.vgg_source,
        "feature_stats": dpa.feature_stats,
        "state_dict": {k: v.detach().cpu() for k, v in dpa.state_dict().items()},
    }
    torch.save(payload, path)


def load_dpa(path: Path, map_location: str | torch.device = "cpu") -> DPA:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported DPA file format {payload.get('format_version')!r}")
    cfg = DPAConfig.model_validate(payload["config"])
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as it was
        dpa = DPA(cfg, VGGSource(bare_vgg19_features(), payload["vgg_source"]))
    dpa.load_state_dict(payload["state_dict"])
    return dpa.eval()
