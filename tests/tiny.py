"""A pipeline run scaled down to seconds on a 2-core CPU, shared by the flow-level tests."""

from __future__ import annotations

from typing import Any

TINY_OVERRIDES: dict[str, Any] = {
    "dataset.n_train_normal": 48,
    "dataset.n_val_normal": 16,
    "dataset.n_test_normal": 16,
    "dataset.n_val_abnormal": 24,
    "dataset.n_test_abnormal": 12,
    "dataset.size": 32,
    "preprocess.size": 16,
    "dpa.network.max_res": 16,
    "dpa.network.enc_channels": {16: 8, 8: 8, 4: 8},
    "dpa.network.dec_channels": {4: 8, 8: 8, 16: 8},
    "dpa.loss.layers": {16: {"r12": 1.0}},
    "dpa.loss.vgg_weights": "random",
    "dpa.train.batch_size": 8,
    "dpa.train.stab_iters": 20,
    "registry.beat_baseline": False,
}
"""The demo preset shrunk: phantoms at 32 px (the data gate's minimum), trained at 16 px. Twenty
iterations do not beat the PCA baseline: the flow-level tests exercise promotion with the baseline
check off (tests/pipeline/test_registry.py tests the check)."""


def tiny_training(model_name: str, **overrides: Any) -> dict[str, Any]:
    """PipelineParams (as JSON) of a tiny demo run registered under `model_name`."""
    return {"preset": "demo", "model_name": model_name, "overrides": {**TINY_OVERRIDES, **overrides}}
