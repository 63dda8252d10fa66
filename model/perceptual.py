"""Relative perceptual L1 loss on VGG19 ReLU features (docs/method.md §2).

ℓ(x, x̂) = Σ_l w_l · mean|f̂_l(x) − f̂_l(x̂)| / stopgrad(mean|f̂_l(x)|) / Σ_l w_l, with f̂ the VGG19
features standardised per channel. The VGG is frozen and its weights come from one of several
sources; the one actually used is recorded in `VGGSource.description` so a run can say it.

Channels whose std on the statistics' images is near zero (they never fire there: common with
random VGG weights) are dead: standardised by that std, any activation of theirs on a
reconstruction would be magnified ~10^6× and decide the loss and the score. A per-layer `keep`
mask, fitted with the statistics and saved with the model, gives them no weight on both sides.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from model.config import VGG_LAYERS

# Index of each ReLU inside torchvision's vgg19().features.
RELU_INDEX = {"r11": 1, "r12": 3, "r21": 6, "r22": 8, "r31": 11, "r32": 13, "r33": 15, "r34": 17,
              "r41": 20, "r42": 22, "r43": 24, "r44": 26, "r51": 29, "r52": 31, "r53": 33, "r54": 35}
assert set(RELU_INDEX) == set(VGG_LAYERS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_STD = 1e-6  # the authors' clamp: what a channel that never fires is divided by
DEAD_SHARE_WARNING = 0.25
log = logging.getLogger(__name__)


class VGGWeightsUnavailable(RuntimeError):
    """ImageNet VGG19 weights are neither cached nor downloadable (offline machine)."""


@dataclass(frozen=True)
class VGGSource:
    features: nn.Sequential
    description: str


def _imagenet_features() -> nn.Sequential:
    found = _imagenet_lookup()
    if isinstance(found, str):
        raise VGGWeightsUnavailable(found)
    features = bare_vgg19_features()
    features.load_state_dict(found)
    return features


@functools.lru_cache(maxsize=1)
def _imagenet_lookup() -> dict[str, torch.Tensor] | str:
    """The ImageNet features' state, or why they are unavailable: looked up once per process, so a
    search of many trials on an offline machine does not try (and wait for) a download per trial."""
    weights = torchvision.models.VGG19_Weights.IMAGENET1K_V1
    try:
        return torchvision.models.vgg19(weights=weights).features.state_dict()
    except Exception as err:  # urllib/SSL/socket errors differ by platform; all mean "could not fetch".
        return (
            f"could not load ImageNet VGG19 weights ({type(err).__name__}: {err}). They are downloaded once to "
            f"$TORCH_HOME/hub/checkpoints ({weights.url}). Offline, copy that file there, or set "
            "loss.vgg_weights to a local state_dict path, or to 'random' (deterministic, not the paper's "
            "perceptual space), or 'auto' (ImageNet if available, else random with a warning)."
        )


@functools.lru_cache(maxsize=4)
def _random_features_state(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.vgg19(weights=None).features.state_dict()


def _random_features(seed: int) -> nn.Sequential:
    """torch.manual_seed(seed) then vgg19(weights=None), without touching the caller's RNG.

    Building the whole VGG19 costs seconds (its classifier is 120M parameters), so the features
    of each seed are built once per process and copied.
    """
    features = bare_vgg19_features()
    features.load_state_dict(_random_features_state(seed))
    return features


def bare_vgg19_features() -> nn.Sequential:
    """torchvision's VGG19 `.features` layout, uninitialised (no RNG use), for weights loaded afterwards."""
    with torch.device("meta"):
        features = make_layers(cfgs["E"])
    return features.to_empty(device="cpu")


def _file_features(path: Path) -> tuple[nn.Sequential, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    features = bare_vgg19_features()
    features.load_state_dict(state)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return features, f"file:{path.name}:sha256={digest}"


def load_vgg_features(source: str, seed: int = 0) -> VGGSource:
    """Return VGG19 `.features` from `imagenet`, `random`, `auto` or a state_dict path."""
    if source == "imagenet":
        return VGGSource(_imagenet_features(), "imagenet")
    if source == "random":
        return VGGSource(_random_features(seed), f"random:seed={seed}")
    if source == "auto":
        try:
            return VGGSource(_imagenet_features(), "imagenet")
        except VGGWeightsUnavailable as err:
            warnings.warn(
                f"FALLING BACK TO RANDOM VGG19 WEIGHTS (seed {seed}): {err}", RuntimeWarning, stacklevel=2
            )
            return VGGSource(_random_features(seed), f"random:seed={seed} (auto fallback: imagenet unavailable)")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"loss.vgg_weights={source!r} is neither imagenet/random/auto nor an existing file")
    return VGGSource(*_file_features(path))


def resolve_feature_stats(choice: str, vgg_description: str) -> str:
    """`imagenet` or `train` for a configured `feature_stats` and the VGG weights actually loaded.

    The reference statistics describe the ImageNet VGG19's features only; with random or other
    weights they are several times off, so `auto` standardises by the training normals instead.
    """
    if choice != "auto":
        return choice
    return "imagenet" if vgg_description == "imagenet" else "train"


def reference_feature_stats(layers: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The authors' per-channel ImageNet (mean, std) of each layer, shipped with the package."""
    path = resources.files("model") / "resources" / "vgg19_imagenet_feature_stats.npz"
    with path.open("rb") as fh, np.load(fh) as stats:
        return {l: (torch.from_numpy(stats[f"{l}_mean"]), torch.from_numpy(stats[f"{l}_std"])) for l in layers}


def to_vgg_input(x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """[-1,1] image (1 or 3 channels) → ImageNet-normalised 3-channel VGG input.

    `mean`/`std` (1×3×1×1 on x's device) avoid building the constants, a host→device copy, per call.
    """
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1) if mean is None else mean
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1) if std is None else std
    return (x * 0.5 + 0.5 - mean) / std


class RelativePerceptualLoss(nn.Module):
    """Frozen VGG19 truncated at the deepest needed layer, plus per-channel statistics buffers."""

    def __init__(self, features: nn.Sequential, layers: list[str], min_channel_std: float = 0.0):
        """`min_channel_std`: the fraction of a layer's median std under which a channel is dead."""
        super().__init__()
        self.layers = sorted(set(layers), key=RELU_INDEX.__getitem__)
        self.min_channel_std = min_channel_std
        self.vgg = features[: RELU_INDEX[self.layers[-1]] + 1]
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        for l in self.layers:
            channels = self.vgg[RELU_INDEX[l] - 1].out_channels
            self.register_buffer(f"mean_{l}", torch.zeros(1, channels, 1, 1))
            self.register_buffer(f"std_{l}", torch.ones(1, channels, 1, 1))
            self.register_buffer(f"keep_{l}", torch.ones(1, channels, 1, 1))
        # Not persistent: constants, so saved DPAs keep their state_dict keys.
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.vgg.eval()

    def train(self, mode: bool = True) -> RelativePerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # frozen feature extractor: never in training mode
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """DPAs saved before the dead-channel mask have no `keep_*`: every channel kept, as they scored."""
        for l in self.layers:
            state_dict.setdefault(f"{prefix}keep_{l}", torch.ones_like(getattr(self, f"keep_{l}")))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-channel (mean, std) of each layer, and which channels are dead under them."""
        for l in self.layers:
            mean, std = stats[l]
            std = std.view(1, -1, 1, 1).clamp_min(MIN_STD)
            getattr(self, f"mean_{l}").copy_(mean.view(1, -1, 1, 1))
            getattr(self, f"std_{l}").copy_(std)
            keep = std >= self.min_channel_std * std.median()
            getattr(self, f"keep_{l}").copy_(keep.to(std.dtype))
            dead = int((~keep).sum())
            if dead > DEAD_SHARE_WARNING * std.numel():
                log.warning("%d of %d channels of VGG layer %s carry no signal on these images (std < %g × the "
                            "layer's median) and get no weight: the layer sees little of them",
                            dead, std.numel(), l, self.min_channel_std)

    def dead_channels(self) -> dict[str, int]:
        """Per layer, how many channels get no weight."""
        return {l: int((getattr(self, f"keep_{l}") == 0).sum()) for l in self.layers}

    def dead_channel_summary(self) -> str:
        """What a run records of its mask, e.g. 'r32 3/256' (dead of all channels, per layer)."""
        return ", ".join(f"{l} {n}/{getattr(self, f'keep_{l}').numel()}" for l, n in self.dead_channels().items())

    def features(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Raw (unstandardised) ReLU features of a [-1,1] image at the requested layers."""
        out, wanted = {}, {RELU_INDEX[l]: l for l in layers}
        h = to_vgg_input(x, self.imagenet_mean.to(x.dtype), self.imagenet_std.to(x.dtype))
        h = h.contiguous(memory_format=torch.channels_last)  # as the DPA; a gray image's 3 channels are one expanded
        for i, module in enumerate(self.vgg[: max(wanted) + 1]):
            h = module(h)
            if i in wanted:
                out[wanted[i]] = h
        return out

    def _standardise(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Standardised features, dead channels zero: the relative loss's numerator and denominator
        then both sum over the kept channels alone."""
        return {l: (f.float() - getattr(self, f"mean_{l}")) / getattr(self, f"std_{l}") * getattr(self, f"keep_{l}")
                for l, f in raw.items()}

    def _standardised(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        return self._standardise(self.features(x, layers))

    @torch.no_grad()
    def target_features(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Raw features of the loss's target image, without autograd: only x̂ needs gradients, so
        the input gets its own pass that keeps no activations (as the reference does)."""
        return self.features(x, layers)

    def relative_to_target(
        self, target: dict[str, torch.Tensor], x_hat: torch.Tensor, weights: dict[str, float]
    ) -> torch.Tensor:
        """Per-sample loss (shape B) of x̂ against the raw target features from `target_features`
        (or a feature cache); equal to `forward(x, x̂)` with the VGG backward over x̂ alone."""
        f_x = self._standardise({l: target[l] for l in weights})
        f_hat = self._standardised(x_hat, list(weights))
        diffs = ((w, (f_x[l] - f_hat[l]).abs(), f_x[l].abs().mean(dim=(1, 2, 3))) for l, w in weights.items())
        return _relative_l1(diffs, weights)

    def _diffs(self, x: torch.Tensor, x_hat: torch.Tensor, weights: dict[str, float]):
        """Yield (weight, |f̂(x) − f̂(x̂)|, detached per-sample mean|f̂(x)|) per layer, one VGG pass."""
        both = self._standardised(torch.cat([x, x_hat]), list(weights))
        for l, w in weights.items():
            f_x, f_hat = both[l].chunk(2)
            yield w, (f_x - f_hat).abs(), f_x.abs().mean(dim=(1, 2, 3)).detach()

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
        """Per-sample relative perceptual L1 loss (shape B)."""
        return _relative_l1(self._diffs(x, x_hat, weights), weights)

    def anomaly_map(self, x: torch.Tensor, x_hat: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
        """Per-pixel map (B×H×W): channel-mean relative |Δ| of each layer, bilinearly upsampled."""
        return _relative_map(self._diffs(x, x_hat, weights), weights, x.shape[-2:])

    def score_and_map(
        self, x: torch.Tensor, x_hat: torch.Tensor, weights: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` and `anomaly_map` from one VGG pass (scoring with heat maps)."""
        diffs = list(self._diffs(x, x_hat, weights))
        return _relative_l1(diffs, weights), _relative_map(diffs, weights, x.shape[-2:])


def _relative_l1(diffs: Iterable[tuple], weights: dict[str, float]) -> torch.Tensor:
    return sum(w * diff.mean(dim=(1, 2, 3)) / norm for w, diff, norm in diffs) / sum(weights.values())


def _relative_map(diffs: Iterable[tuple], weights: dict[str, float], size: torch.Size) -> torch.Tensor:
    maps = [
        w * F.interpolate(diff.mean(dim=1, keepdim=True) / norm.view(-1, 1, 1, 1), size=size,
                          mode="bilinear", align_corners=False)
        for w, diff, norm in diffs
    ]
    return (sum(maps) / sum(weights.values()))[:, 0]


@torch.no_grad()
def training_feature_stats(
    loss: RelativePerceptualLoss, batches: Iterable[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean/std of each layer's features over batches of [-1,1] images (on loss's device)."""
    sums: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for batch in batches:
        for l, f in loss.features(batch, loss.layers).items():
            f = f.double()
            sums[l] = sums.get(l, 0) + f.sum(dim=(0, 2, 3))
            sq[l] = sq.get(l, 0) + (f * f).sum(dim=(0, 2, 3))
            count[l] = count.get(l, 0) + f.numel() // f.shape[1]
    stats = {}
    for l in loss.layers:
        mean = sums[l] / count[l]
        std = (sq[l] / count[l] - mean * mean).clamp_min(0).sqrt().clamp_min(MIN_STD)
        stats[l] = (mean.float().cpu(), std.float().cpu())
    return stats
