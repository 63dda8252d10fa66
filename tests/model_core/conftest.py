"""Small DPA configurations and a synthetic task: tiny enough for a 2-core CPU."""

from __future__ import annotations

import pytest
import torch

from model.config import DPAConfig


def tiny_config(res: int = 16, initial_res: int | None = None, **train) -> DPAConfig:
    levels = [r for r in (4, 8, 16, 32, 64) if r <= res]
    layers = {r: {"r12": 1.0} for r in levels if r >= (initial_res or res)}
    return DPAConfig.model_validate(
        {
            "network": {
                "image_channels": 1,
                "max_res": res,
                "latent_dim": 8,
                "enc_channels": {r: 8 for r in levels},
                "dec_channels": {r: 8 for r in levels},
            },
            "loss": {"layers": layers, "vgg_weights": "random"},
            "train": {"lr": 2e-3, "batch_size": 8, "stab_iters": 4, "initial_res": initial_res, **train},
        }
    )


def blob_images(n: int, res: int, seed: int, anomalous: bool = False) -> torch.Tensor:
    """Smooth random blobs (normal) or the same with a bright square and stripes (anomalous); uint8."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 0.6 - 0.3
    width = 0.3 + 0.2 * torch.rand(n, generator=g)
    img = torch.exp(-((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) / width[:, None, None])
    img = 0.15 + 0.6 * img
    if anomalous:
        size = res // 3
        pos = torch.randint(0, res - size, (n, 2), generator=g)
        stripes = (torch.arange(res) % 2).float()[None, :] * torch.ones(res, 1)
        for i in range(n):  # test data construction only
            y, x = pos[i].tolist()
            img[i, y : y + size, x : x + size] = stripes[:size, :size]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)[:, None]


@pytest.fixture
def tiny() -> DPAConfig:
    return tiny_config()
