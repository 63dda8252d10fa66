"""Batched inference with a trained DPA: anomaly scores and per-pixel anomaly maps."""

from __future__ import annotations

import torch

from model.dpa import DPA
from model.trainer import autocast


def _batched(dpa: DPA, images: torch.Tensor, batch_size: int, fn) -> torch.Tensor:
    device = next(dpa.parameters()).device
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    dpa.eval()
    out = []
    with torch.inference_mode(), autocast(device, dpa.cfg.train.bf16):
        for batch in images.split(batch_size):
            out.append(fn(batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def score_images(dpa: DPA, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """One anomaly score per image (uint8 or [-1,1] float N×C×H×W); higher means more anomalous."""
    return _batched(dpa, images, batch_size, dpa.score)


def anomaly_maps(dpa: DPA, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-pixel anomaly maps (N×H×W at the model's resolution)."""
    return _batched(dpa, images, batch_size, dpa.anomaly_map)
