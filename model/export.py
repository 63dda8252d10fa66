"""The DPA's scoring graph as one module, for inference servers outside Python (ONNX).

Everything from the preprocessed image to the score is inside the graph: uint8 → [-1, 1], the
centre crop to the final resolution, the autoencoder, the standardised VGG19 features with their
dead-channel mask, the relative perceptual distance and the per-image score (optionally the anomaly
map too). Decoding and resizing (data_layer.preprocessing) stay outside; the exporter's sidecar
says how to do them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from model.dpa import DPA

INPUT, SCORE, MAP = "images", "anomaly_score", "anomaly_map"
OPSET = 18


class ScoringGraph(nn.Module):
    """uint8 N×C×S×S images → anomaly scores (N), and with `maps` the N×S×S anomaly maps."""

    def __init__(self, dpa: DPA, maps: bool = False):
        super().__init__()
        self.dpa, self.maps = dpa.eval(), maps

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.dpa.score_and_map(images) if self.maps else self.dpa.score(images)


def export_onnx(dpa: DPA, channels: int, size: int, path: Path, maps: bool = False) -> None:
    """Write the scoring graph of `dpa` (fp32, CPU) with a dynamic batch axis to `path`.

    torch.onnx's TorchScript exporter: the dynamo exporter of torch 2.14 fails in its graph
    optimisation on this model (onnx_ir's inliner), and both give the same operators here."""
    graph = ScoringGraph(dpa.float().cpu(), maps).eval()
    example = torch.zeros((2, channels, size, size), dtype=torch.uint8)
    outputs = [SCORE, MAP] if maps else [SCORE]
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shape tests (crop or not, grey or RGB) are frozen: right, the image size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph, (example,), str(path), input_names=[INPUT], output_names=outputs, opset_version=OPSET,
            dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]}, dynamo=False,
        )
