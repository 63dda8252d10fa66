"""Channels that never fire on the statistics' images get no weight (loss, score, heat map), the
mask travels with the model, and DPAs saved before it score exactly as they did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.dpa import load_dpa, save_dpa
from model.perceptual import RelativePerceptualLoss, load_vgg_features
from model.scoring import score_images
from model.trainer import Trainer
from tests.model_core.conftest import blob_images, tiny_config

DATA = Path(__file__).resolve().parents[1] / "data"
LAYERS = {"r12": 1.0, "r22": 1.0}


def _loss(min_channel_std: float) -> RelativePerceptualLoss:
    loss = RelativePerceptualLoss(load_vgg_features("random").features, list(LAYERS), min_channel_std)
    g = torch.Generator().manual_seed(0)
    loss.set_stats({l: (torch.rand(c, generator=g), 0.5 + torch.rand(c, generator=g)) for l, c in (("r12", 64), ("r22", 128))})
    return loss


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = blob_images(4, 16, seed=0).float() / 127.5 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    return x, x_hat


def _kill(loss: RelativePerceptualLoss, layer: str, channel: int) -> None:
    """Refit the statistics with one channel that never fired on the statistics' images."""
    stats = {l: (getattr(loss, f"mean_{l}").flatten(), getattr(loss, f"std_{l}").flatten().clone()) for l in LAYERS}
    stats[layer][1][channel] = 0.0
    loss.set_stats(stats)


def test_with_no_dead_channel_loss_gradients_and_scores_are_unchanged() -> None:
    masked, unmasked = _loss(0.01), _loss(0.0)
    assert masked.dead_channels() == {"r12": 0, "r22": 0}
    x, x_hat = _inputs()
    a = masked(x, x_hat, LAYERS)
    (grad_a,) = torch.autograd.grad(a.sum(), x_hat)
    b = unmasked(x, x_hat, LAYERS)
    (grad_b,) = torch.autograd.grad(b.sum(), x_hat)
    assert torch.equal(a, b) and torch.equal(grad_a, grad_b)
    assert torch.equal(masked.anomaly_map(x, x_hat, LAYERS), unmasked.anomaly_map(x, x_hat, LAYERS))


def test_a_dead_channel_does_not_move_the_loss_when_one_side_activates_it() -> None:
    x, x_hat = _inputs()
    features = RelativePerceptualLoss(load_vgg_features("random").features, ["r12"]).features(x, ["r12"])["r12"]
    fired = features.clone()
    fired[:, 5] += 3.0  # channel 5 fires on one side only
    losses = {}
    for min_channel_std in (0.01, 0.0):
        loss = _loss(min_channel_std)
        _kill(loss, "r12", 5)
        with torch.no_grad():
            losses[min_channel_std] = [loss.relative_to_target({"r12": f}, x_hat, {"r12": 1.0}) for f in (features, fired)]
    masked, clamped = losses[0.01], losses[0.0]
    assert torch.equal(masked[0], masked[1])
    assert (clamped[1] / clamped[0]).min() > 10  # the authors' clamp: that one channel decides the loss


def test_the_mask_is_fitted_on_the_training_normals_saved_and_reloaded_bit_identically(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(stab_iters=4), blob_images(32, 16, seed=0), progress=False)
    dpa = trainer.fit()
    assert dpa.perceptual.dead_channels()["r12"] >= 1  # random VGG on smooth blobs: some channels never fire
    save_dpa(dpa, tmp_path / "dpa.pt")
    again = load_dpa(tmp_path / "dpa.pt")
    assert again.perceptual.dead_channels() == dpa.perceptual.dead_channels()
    images = blob_images(8, 16, seed=3, anomalous=True)
    assert torch.equal(score_images(dpa, images, 8), score_images(again, images, 8))


def test_a_dpa_saved_before_the_mask_loads_and_scores_exactly_as_it_did() -> None:
    """tests/data/dpa_saved_before_channel_mask.pt was written by the code before the mask (one
    r12 channel of its training statistics has std 1e-6); its scores then are in the .json."""
    expected = json.loads((DATA / "dpa_saved_before_channel_mask.json").read_text())
    dpa = load_dpa(DATA / "dpa_saved_before_channel_mask.pt")
    assert dpa.perceptual.dead_channels() == {"r12": 0}  # every channel kept, as it was trained
    images = torch.cat([blob_images(4, 16, seed=5), blob_images(4, 16, seed=6, anomalous=True)])
    assert [float(s).hex() for s in score_images(dpa, images, 8)] == expected["scores_hex"]


def test_zero_reproduces_the_authors_clamp() -> None:
    cfg = tiny_config(stab_iters=1)
    assert cfg.loss.min_channel_std == 0.01
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"min_channel_std": 0.0})})
    dpa = Trainer(cfg, blob_images(32, 16, seed=0), progress=False).dpa
    assert dpa.perceptual.dead_channels() == {"r12": 0} and dpa.perceptual.std_r12.min() == pytest.approx(1e-6)
