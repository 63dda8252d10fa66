"""Tiny searches on phantoms: 16×16 images, two small ladder rungs, 20 iterations, random VGG weights."""

from __future__ import annotations

from typing import Any

TINY_SEARCH: dict[str, Any] = {
    "ladder": [{"latent_dim": 4, "width": 4, "lr": 1.0e-2}, {"latent_dim": 8, "width": 8, "lr": 5.0e-3}],
    "vgg_layers": [["r12"]],
    "progressive": [False, True],
    "pg": {"initial_res": 8, "stab_iters": 4, "trns_iters": 4, "layers": {8: {"r12": 1.0}}},
    "max_iters": 20,
    "val_every": 10,
    "patience": 2,
    "min_delta": 0.0,
}
"""Four grid points: two ladder rungs × progressive growing off/on."""
