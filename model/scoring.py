"""Batched inference with a trained DPA: anomaly scores and per-pixel anomaly maps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.dpa import DPA, MEMORY_FORMAT
from model.trainer import autocast


def _batched(dpa: DPA, images: torch.Tensor, batch_size: int, fn: Callable) -> tuple[torch.Tensor, ...]:
    """Run `fn` (returning one tensor or a tuple) batch by batch; concatenate each output on the CPU."""
    device = next(dpa.parameters()).device
    dpa.eval()
    outputs = []
    with torch.inference_mode(), autocast(device, dpa.cfg.train.bf16):
        for batch in images.split(batch_size):
            result = fn(batch.to(device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT))
            outputs.append(tuple(t.float().cpu() for t in (result if isinstance(result, tuple) else (result,))))
    if not outputs:
        return (torch.empty(0),)
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def score_images(dpa: DPA, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """One anomaly score per image (uint8 or [-1,1] float N×C×H×W); higher means more anomalous."""
    return _batched(dpa, images, batch_size, dpa.score)[0]


def anomaly_maps(dpa: DPA, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-pixel anomaly maps (N×H×W at the model's resolution)."""
    return _batched(dpa, images, batch_size, dpa.anomaly_map)[0]


def scores_and_maps(dpa: DPA, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Both, from one pass through the network per batch (serving with heat maps)."""
    if len(images) == 0:
        return torch.empty(0), torch.empty(0)
    scores, maps = _batched(dpa, images, batch_size, dpa.score_and_map)
    return scores, maps
