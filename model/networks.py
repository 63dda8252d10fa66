"""The residual18 encoder and decoder of DPA, with progressive-growing fade-in.

Read top to bottom: three pre-activation blocks, then the encoder and decoder. Each network owns
one `from_rgb`/`to_rgb` head per resolution it can work at; `forward(x, res, alpha)` runs the
stable network at `res` (alpha=None) or the transition network that fades `res` in over `res/2`
(docs/method.md §1, §1.1). No normalisation layers, no tanh, no latent activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import NetworkConfig, resolution_levels

SLOPE = 0.2


def conv(c_in: int, c_out: int, kernel: int = 3, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2 if padding is None else padding)


def act() -> nn.LeakyReLU:
    return nn.LeakyReLU(SLOPE)


class PreAct(nn.Module):
    """act → conv3×3 → act → conv3×3, plus an identity (or 1×1 conv) skip; optional resampling first."""

    def __init__(self, c_in: int, c_out: int, resample: nn.Module | None = None):
        super().__init__()
        resample = resample or nn.Identity()
        self.main = nn.Sequential(act(), resample, conv(c_in, c_out), act(), conv(c_out, c_out))
        self.skip = nn.Sequential(resample, conv(c_in, c_out, 1) if c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.main(x)


def pre_act_down(c_in: int, c_out: int) -> PreAct:
    return PreAct(c_in, c_out, nn.AvgPool2d(2))


def pre_act_up(c_in: int, c_out: int) -> PreAct:
    return PreAct(c_in, c_out, nn.Upsample(scale_factor=2, mode="nearest"))


def kaiming_init(module: nn.Module) -> None:
    """The reference re-initialises every conv this way; biases keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=SLOPE)


def fade(low: torch.Tensor, high: torch.Tensor, alpha: float) -> torch.Tensor:
    return low * (1.0 - alpha) + high * alpha


class Encoder(nn.Module):
    """Image at `res` → latent (B×d×1×1, or B×d×L×L when latent_res=L>1)."""

    def __init__(self, cfg: NetworkConfig, initial_res: int):
        super().__init__()
        n = cfg.enc_channels
        self.first_res = cfg.first_res
        self.from_rgb = nn.ModuleDict(
            {
                str(r): nn.Sequential(conv(cfg.image_channels, n[r]), PreAct(n[r], n[r]), PreAct(n[r], n[r]))
                for r in resolution_levels(initial_res, cfg.max_res)
            }
        )
        self.blocks = nn.ModuleDict(
            {
                str(r): nn.Sequential(pre_act_down(n[r], n[r // 2]), PreAct(n[r // 2], n[r // 2]))
                for r in resolution_levels(2 * cfg.first_res, cfg.max_res)
            }
        )
        if cfg.latent_res == 1:
            self.last = nn.Sequential(act(), conv(n[4], cfg.latent_dim, kernel=4, padding=0))
        else:
            self.last = PreAct(n[cfg.first_res], cfg.latent_dim)
        kaiming_init(self)

    def _blocks_from(self, h: torch.Tensor, res: int) -> torch.Tensor:
        while res > self.first_res:
            h = self.blocks[str(res)](h)
            res //= 2
        return self.last(h)

    def forward(self, x: torch.Tensor, res: int, alpha: float | None = None) -> torch.Tensor:
        if alpha is None:
            return self._blocks_from(self.from_rgb[str(res)](x), res)
        low = self.from_rgb[str(res // 2)](F.avg_pool2d(x, 2))
        high = self.blocks[str(res)](self.from_rgb[str(res)](x))
        return self._blocks_from(fade(low, high, alpha), res // 2)


class Decoder(nn.Module):
    """Latent → image at `res`; the output is linear (no tanh, no clamp)."""

    def __init__(self, cfg: NetworkConfig, initial_res: int):
        super().__init__()
        n = cfg.dec_channels
        self.first_res = cfg.first_res
        if cfg.latent_res == 1:
            self.first = nn.Sequential(act(), conv(cfg.latent_dim, n[4], kernel=4, padding=3))
        else:
            self.first = PreAct(n[cfg.first_res], n[cfg.first_res])
        self.blocks = nn.ModuleDict(
            {
                str(r): nn.Sequential(pre_act_up(n[r // 2], n[r]), PreAct(n[r], n[r]))
                for r in resolution_levels(2 * cfg.first_res, cfg.max_res)
            }
        )
        self.to_rgb = nn.ModuleDict(
            {
                str(r): nn.Sequential(act(), conv(n[r], cfg.image_channels))
                for r in resolution_levels(initial_res, cfg.max_res)
            }
        )
        kaiming_init(self)

    def _blocks_to(self, z: torch.Tensor, res: int) -> torch.Tensor:
        h = self.first(z)
        r = self.first_res * 2
        while r <= res:
            h = self.blocks[str(r)](h)
            r *= 2
        return h

    def forward(self, z: torch.Tensor, res: int, alpha: float | None = None) -> torch.Tensor:
        if alpha is None:
            return self.to_rgb[str(res)](self._blocks_to(z, res))
        h = self._blocks_to(z, res // 2)
        low = F.interpolate(self.to_rgb[str(res // 2)](h), scale_factor=2, mode="nearest")
        high = self.to_rgb[str(res)](self.blocks[str(res)](h))
        return fade(low, high, alpha)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
