"""`feature_stats: auto` picks the statistics that belong to the VGG weights actually loaded."""

from __future__ import annotations

import pytest
import torch

from model.dpa import DPA, load_dpa, save_dpa
from model.perceptual import VGGSource, bare_vgg19_features, reference_feature_stats, resolve_feature_stats
from model.trainer import Trainer
from tests.model_core.conftest import blob_images, tiny_config


@pytest.mark.parametrize(
    ("choice", "vgg", "expected"),
    [
        ("auto", "imagenet", "imagenet"),
        ("auto", "random:seed=0", "train"),
        ("auto", "random:seed=0 (auto fallback: imagenet unavailable)", "train"),
        ("auto", "file:vgg.pth:sha256=0123", "train"),
        ("imagenet", "random:seed=0", "imagenet"),
        ("train", "imagenet", "train"),
    ],
)
def test_auto_chooses_by_weight_source(choice: str, vgg: str, expected: str) -> None:
    assert resolve_feature_stats(choice, vgg) == expected


def _with_stats(choice: str):
    cfg = tiny_config(stab_iters=1)
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"feature_stats": choice})})


def test_auto_is_the_default_and_fits_training_normals_with_random_weights(tmp_path) -> None:
    cfg = tiny_config(stab_iters=1)
    assert cfg.loss.feature_stats == "auto"
    trainer = Trainer(cfg, blob_images(16, 16, seed=0), progress=False)
    assert trainer.dpa.feature_stats == "train"
    x = blob_images(16, 16, seed=0).float() / 127.5 - 1
    f = trainer.dpa.perceptual.features(x, ["r12"])["r12"]
    assert torch.allclose(trainer.dpa.perceptual.mean_r12.flatten(), f.mean(dim=(0, 2, 3)), atol=1e-4)
    save_dpa(trainer.fit(), tmp_path / "dpa.pt")
    assert torch.load(tmp_path / "dpa.pt", weights_only=True)["feature_stats"] == "train"
    assert load_dpa(tmp_path / "dpa.pt").feature_stats == "train"


def test_auto_uses_the_reference_statistics_with_imagenet_weights() -> None:
    """ImageNet weights are not on these machines; the choice depends only on the recorded source."""
    dpa = DPA(_with_stats("auto"), VGGSource(bare_vgg19_features(), "imagenet"))
    mean, std = reference_feature_stats(["r12"])["r12"]
    assert dpa.feature_stats == "imagenet"
    assert torch.equal(dpa.perceptual.mean_r12.flatten(), mean) and torch.equal(dpa.perceptual.std_r12.flatten(), std)


def test_an_explicit_choice_is_kept() -> None:
    dpa = DPA.build(_with_stats("imagenet"))
    assert dpa.feature_stats == "imagenet"
    assert torch.equal(dpa.perceptual.mean_r12.flatten(), reference_feature_stats(["r12"])["r12"][0])
