"""Typed configuration of the DPA method (network, perceptual loss, training schedule).

Everything the method needs is here and nothing else, so a preset YAML, the CLI and the Prefect
UI form all describe the same object. Channel counts are explicit resolution → channels
mappings; `channels_from_reference_lists` translates the authors' two oppositely indexed
`inner_dims` lists (docs/method.md §1, §9.4).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

VGG_LAYERS = ("r11", "r12", "r21", "r22", "r31", "r32", "r33", "r34", "r41", "r42", "r43", "r44", "r51", "r52", "r53", "r54")
LAYER_ALIASES = {f"relu{n[1]}_{n[2]}": n for n in VGG_LAYERS}


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def canonical_layer(name: str) -> str:
    """Accept `relu3_2` or `r32`; return the short form used by the statistics file."""
    name = LAYER_ALIASES.get(name, name)
    if name not in VGG_LAYERS:
        raise ValueError(f"unknown VGG19 layer {name!r}; use one of {', '.join(VGG_LAYERS)} (or relu3_2 style)")
    return name


def resolution_levels(first_res: int, max_res: int) -> list[int]:
    """Resolutions first_res, 2·first_res, …, max_res."""
    return [2**k for k in range(int(math.log2(first_res)), int(math.log2(max_res)) + 1)]


def channels_from_reference_lists(
    inner_dims: list[int], max_res: int, latent_res: int, side: Literal["encoder", "decoder"]
) -> dict[int, int]:
    """Translate the reference `inner_dims` list into resolution → channels.

    The encoder indexes the list from its end (highest resolution first); the decoder from its
    start (lowest resolution first). Surplus entries are ignored, as in the reference.
    """
    levels = resolution_levels(max(4, latent_res), max_res)
    if len(inner_dims) < len(levels):
        raise ValueError(f"inner_dims has {len(inner_dims)} entries, needs at least {len(levels)} for {levels}")
    if side == "encoder":
        return {r: inner_dims[-i - 1] for i, r in enumerate(levels)}
    return {r: inner_dims[i] for i, r in enumerate(levels)}


class NetworkConfig(BaseModel):
    """The residual18 autoencoder (docs/method.md §1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_channels: Literal[1, 3] = 1
    max_res: int = 64
    latent_res: int = Field(1, description="1 for a 1×1×d bottleneck, else L for an L×L×d latent")
    latent_dim: int = 16
    enc_channels: dict[int, int]
    dec_channels: dict[int, int]

    @property
    def first_res(self) -> int:
        """Resolution of the innermost block (4, or latent_res when that is larger)."""
        return max(4, self.latent_res)

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        if not _is_power_of_two(self.max_res) or self.max_res < 4:
            raise ValueError(f"max_res must be a power of two ≥ 4, got {self.max_res}")
        if self.latent_res != 1 and (not _is_power_of_two(self.latent_res) or self.latent_res > self.max_res):
            raise ValueError(f"latent_res must be 1 or a power of two ≤ max_res, got {self.latent_res}")
        levels = resolution_levels(self.first_res, self.max_res)
        for side, mapping in (("enc_channels", self.enc_channels), ("dec_channels", self.dec_channels)):
            missing = [r for r in levels if r not in mapping]
            if missing:
                raise ValueError(f"{side} lacks resolutions {missing}; it needs one entry for each of {levels}")
        if self.latent_res > 1 and self.latent_dim != self.dec_channels[self.first_res]:
            raise ValueError(
                f"with latent_res={self.latent_res} the latent channels ({self.latent_dim}) must equal "
                f"dec_channels[{self.first_res}] ({self.dec_channels[self.first_res]})"
            )
        return self


class LossConfig(BaseModel):
    """The relative perceptual L1 loss (docs/method.md §2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: dict[int, dict[str, float]] = Field(
        description="per resolution, VGG19 ReLU layer → weight, e.g. {64: {r32: 1.0}}"
    )
    vgg_weights: str = Field(
        "auto",
        description="imagenet (torchvision download/cache), random (seeded), auto (imagenet, else random "
        "with a loud warning), or a path to a VGG19 state_dict file",
    )
    vgg_seed: int = 0
    feature_stats: Literal["auto", "imagenet", "train"] = Field(
        "auto",
        description="per-channel standardisation: imagenet (the authors' reference statistics), train (the "
        "training normals'), or auto (imagenet with ImageNet weights, train with random or other weights: the "
        "reference statistics belong to the ImageNet network only)",
    )
    min_channel_std: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="a feature channel whose std on the statistics' images is below this fraction of its layer's "
        "median std carries no signal there and gets no weight in the loss, the score and the heat map (standardised "
        "by a near-zero std it would be magnified ~10^6× and decide both). 0 keeps every channel, as the authors' "
        "code does (std clamped at 1e-6)",
    )

    @model_validator(mode="after")
    def _canonical(self) -> LossConfig:
        for res, weights in self.layers.items():
            if not weights or sum(weights.values()) <= 0:
                raise ValueError(f"loss layers at resolution {res} need positive weights")
            for name in weights:
                canonical_layer(name)
        return self

    def layers_at(self, res: int) -> dict[str, float]:
        """Canonical layer weights used at `res`."""
        if res not in self.layers:
            raise ValueError(f"no VGG layer configured for resolution {res}; loss.layers has {sorted(self.layers)}")
        return {canonical_layer(k): v for k, v in self.layers[res].items()}


class AugmentConfig(BaseModel):
    """Training-time augmentation (Camelyon16 only in the paper: random crop and flips)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    random_crop: bool = False
    hflip: bool = False
    vflip: bool = False
    frozen: bool = Field(
        False,
        description="draw one seeded crop/flip per training image, once, and reuse it at every draw (the authors "
                    "cache the transformed training set for Camelyon16 with PG)",
    )


class TrainConfig(BaseModel):
    """Iteration-based schedule with optional progressive growing (docs/method.md §1.1, §4)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = 1e-3
    batch_size: int = 128
    initial_res: int | None = Field(None, description="first PG resolution; None trains at max_res only (wo_pg)")
    stab_iters: int = 1000
    trns_iters: int = 0
    iters_per_res: dict[int, dict[Literal["stab", "trns"], int]] = Field(default_factory=dict)
    smooth_pg_loss: bool = True
    augment: AugmentConfig = AugmentConfig()
    seed: int = 0
    seeds: int = Field(1, ge=1, description="train this many seeds (seed, seed+1, …) in parallel and report their spread")
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (CPU always runs fp32)")
    checkpoint_every: int = Field(0, description="save a resumable checkpoint every N iterations (0: only at the end)")
    log_every: int = 10
    score_batch_size: int = 32
    feature_cache_mb: int = Field(
        4096, ge=0, description="device memory for caching the input's VGG features when the input is the same at every draw "
        "(no random crop/flip, or frozen augmentation; 0: off)"
    )
    compile: bool = Field(False, description="torch.compile the training loss (falls back to eager, logged, if it fails)")
    nproc_per_node: int = Field(
        1, ge=1, description="train on this many processes with DDP through torchrun (one per GPU; CPU: gloo); "
        "each takes batch_size/nproc_per_node of every batch"
    )

    @model_validator(mode="after")
    def _check_processes(self) -> TrainConfig:
        n = self.nproc_per_node
        if self.batch_size % n:
            raise ValueError(f"train.batch_size={self.batch_size} must be divisible by train.nproc_per_node={n}")
        if n > 1 and ":" in self.device:
            raise ValueError(
                f"train.device={self.device} with train.nproc_per_node={n}: each process takes the GPU of its "
                "local rank; set train.device to cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        return self


class DPAConfig(BaseModel):
    """The whole method: network + loss + training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: NetworkConfig
    loss: LossConfig
    train: TrainConfig = TrainConfig()

    @property
    def initial_res(self) -> int:
        """First training resolution: train.initial_res with progressive growing, else max_res."""
        return self.train.initial_res or self.network.max_res

    @model_validator(mode="after")
    def _check_schedule(self) -> DPAConfig:
        init = self.initial_res
        if not _is_power_of_two(init) or not self.network.first_res <= init <= self.network.max_res:
            raise ValueError(
                f"train.initial_res={init} must be a power of two between {self.network.first_res} and {self.network.max_res}"
            )
        for res in resolution_levels(init, self.network.max_res):
            self.loss.layers_at(res)
        return self
