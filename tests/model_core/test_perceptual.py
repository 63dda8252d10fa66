"""The relative perceptual L1 loss (docs/method.md §2)."""

import urllib.error
import warnings

import pytest
import torch
import torchvision

from model import perceptual
from model.dpa import DPA
from model.perceptual import (
    RelativePerceptualLoss,
    VGGWeightsUnavailable,
    load_vgg_features,
    reference_feature_stats,
    to_vgg_input,
)
from tests.model_core.conftest import blob_images


@pytest.fixture(scope="module")
def loss() -> RelativePerceptualLoss:
    module = RelativePerceptualLoss(load_vgg_features("random").features, ["r12", "r22"])
    module.set_stats(reference_feature_stats(module.layers))
    return module


def test_zero_for_identical_inputs(loss) -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.all(loss(x, x.clone(), {"r12": 1.0, "r22": 2.0}) == 0)


def test_invariant_to_scaling_the_feature_norm(loss) -> None:
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    before = loss(x, y, {"r22": 1.0})
    scaled = RelativePerceptualLoss(loss.vgg, ["r22"])
    scaled.set_stats({"r22": (loss.mean_r22.flatten(), loss.std_r22.flatten() / 7.0)})
    assert torch.allclose(scaled(x, y, {"r22": 1.0}), before, rtol=1e-5)


def test_is_relative_to_the_input_feature_norm(loss) -> None:
    x, y = torch.rand(1, 1, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16) * 2 - 1
    f_x, f_y = (((f.float() - loss.mean_r12) / loss.std_r12) for f in (loss.features(x, ["r12"])["r12"], loss.features(y, ["r12"])["r12"]))
    expected = (f_x - f_y).abs().mean() / f_x.abs().mean()
    assert torch.allclose(loss(x, y, {"r12": 1.0}), expected.view(1), rtol=1e-5)


def test_gradient_reaches_the_autoencoder_never_the_vgg(tiny) -> None:
    dpa = DPA.build(tiny)
    x = blob_images(4, 16, seed=0).float() / 127.5 - 1
    dpa.score(x).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dpa.decoder.parameters())
    assert all(p.grad is not None for p in dpa.encoder.parameters())
    assert all(p.grad is None and not p.requires_grad for p in dpa.perceptual.vgg.parameters())


def test_grayscale_goes_to_vgg_by_channel_replication_after_imagenet_mapping() -> None:
    x = torch.full((1, 1, 2, 2), 0.2)
    out = to_vgg_input(x)
    expected = (0.6 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expected)


def test_reference_stats_are_standard_deviations() -> None:
    mean, std = reference_feature_stats(["r32"])["r32"]
    assert mean.shape == std.shape == (256,)
    assert torch.all(std > 0) and torch.all(mean >= 0)  # post-ReLU means are non-negative


def test_random_weights_are_deterministic_and_keep_the_callers_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_vgg_features("random", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torchvision.models.vgg19(weights=None).features
    b = load_vgg_features("random", seed=0)
    for p, q, r in zip(a.features.parameters(), b.features.parameters(), reference.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert a.description == "random:seed=0"
    assert not torch.equal(next(load_vgg_features("random", seed=1).features.parameters()), next(a.features.parameters()))


def _offline(*args, **kwargs):
    raise urllib.error.URLError("Name or service not known")


def test_imagenet_offline_fails_fast_naming_the_alternatives(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with pytest.raises(VGGWeightsUnavailable, match="random.*auto"):
        load_vgg_features("imagenet")


def test_auto_falls_back_loudly_and_records_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = load_vgg_features("auto")
    assert any("FALLING BACK TO RANDOM VGG19" in str(w.message) for w in caught)
    assert source.description.startswith("random:seed=0 (auto fallback")


def test_imagenet_weights_are_looked_up_once_per_process(monkeypatch, tmp_path) -> None:
    """A search builds a DPA per trial and fold: offline, each build must not retry the download."""
    calls = []

    def offline_counted(*args, **kwargs):
        calls.append(args)
        _offline()

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline_counted)  # where torchvision calls it
    perceptual._imagenet_lookup.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sources = [load_vgg_features("auto") for _ in range(3)]
        with pytest.raises(VGGWeightsUnavailable, match="could not load ImageNet VGG19 weights"):
            load_vgg_features("imagenet")
    finally:
        perceptual._imagenet_lookup.cache_clear()
    assert len(calls) == 1
    assert all(s.description.startswith("random:seed=0 (auto fallback") for s in sources)


def test_local_state_dict_file(tmp_path) -> None:
    path = tmp_path / "vgg19.pth"
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), path)
    source = load_vgg_features(str(path))
    assert source.description.startswith("file:vgg19.pth:sha256=")
    saved = torch.load(path, weights_only=True)
    assert torch.equal(source.features[0].weight, saved["features.0.weight"])


def test_uint8_images_map_to_minus_one_one() -> None:
    from model.dpa import to_model_range

    y = to_model_range(torch.tensor([0, 127, 255], dtype=torch.uint8))
    assert y.dtype == torch.float32
    assert y[0] == -1.0 and y[2] == 1.0 and abs(y[1]) < 0.01
