"""The paper presets build the reference networks: parameter counts pin the architecture."""

from pathlib import Path

import pytest
import yaml

from model.config import DPAConfig, channels_from_reference_lists
from model.networks import Decoder, Encoder, count_parameters

CONFIGS = Path(__file__).parents[2] / "configs"


def preset(name: str) -> DPAConfig:
    return DPAConfig.model_validate(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["dpa"])


@pytest.mark.parametrize(
    ("name", "encoder", "decoder"),
    [
        ("cifar10_class0", 165_280, 128_259),
        ("cifar10_class3", 3_841_472, 2_061_507),
        ("nih_pa_wo_pg", 50_672, 41_377),
        ("nih_ap_wo_pg", 804_800, 657_025),
        ("camelyon16_wo_pg", 2_776, 2_183),
    ],
)
def test_reference_parameter_counts(name: str, encoder: int, decoder: int) -> None:
    cfg = preset(name)
    res = cfg.network.max_res
    assert count_parameters(Encoder(cfg.network, res)) == encoder
    assert count_parameters(Decoder(cfg.network, res)) == decoder


def test_reference_lists_are_indexed_in_opposite_directions() -> None:
    dims = [32, 64, 128, 256]
    assert channels_from_reference_lists(dims, 32, 1, "encoder") == {4: 256, 8: 128, 16: 64, 32: 32}
    assert channels_from_reference_lists(dims, 32, 1, "decoder") == {4: 32, 8: 64, 16: 128, 32: 256}
    # surplus entries: the encoder keeps the last ones, the decoder the first ones
    seven = [1, 2, 3, 4, 5, 6, 7]
    assert channels_from_reference_lists(seven, 64, 1, "encoder") == {4: 7, 8: 6, 16: 5, 32: 4, 64: 3}
    assert channels_from_reference_lists(seven, 64, 1, "decoder") == {4: 1, 8: 2, 16: 3, 32: 4, 64: 5}


def test_cifar_class3_preset_matches_reference_lists() -> None:
    net = preset("cifar10_class3").network
    assert net.enc_channels == channels_from_reference_lists([32, 64, 128, 256], 32, 1, "encoder")
    assert net.dec_channels == channels_from_reference_lists([256, 128, 64, 32], 32, 1, "decoder")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_is_a_valid_config(name: str) -> None:
    preset(name)


def test_shapes_of_both_latent_kinds() -> None:
    import torch

    for name, latent in (("nih_pa_wo_pg", (16, 1, 1)), ("camelyon16_wo_pg", (4, 8, 8))):
        cfg = preset(name).network
        x = torch.zeros(2, cfg.image_channels, 64, 64)
        z = Encoder(cfg, 64)(x, 64)
        assert tuple(z.shape[1:]) == latent
        assert Decoder(cfg, 64)(z, 64).shape == x.shape
