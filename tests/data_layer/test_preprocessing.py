"""The shared transform, the [-1, 1] helper and the decoded-dataset cache."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from pydantic import ValidationError

from data_layer.manifest import COLUMNS, write_manifest
from data_layer.phantoms import PhantomSpec, generate_phantoms
from data_layer.pixels import ImageReadError
from data_layer.preprocessing import (
    PreprocessConfig,
    preprocess_dataset,
    preprocess_image,
    preprocess_images,
)


def noise(size=(40, 30), mode="L", seed=0) -> Image.Image:
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def test_paper_order_grayscale_crop_equalize_resize():
    image = noise((300, 300), "RGB")
    cfg = PreprocessConfig(channels=1, center_crop=224, equalize=True, size=64)
    expected = ImageOps.equalize(image.convert("L").crop((38, 38, 262, 262)))
    expected = np.asarray(expected.resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(preprocess_image(image, cfg), expected[None])


def test_fractional_crop_matches_pixels():
    image = noise((300, 300))
    by_pixels = preprocess_image(image, PreprocessConfig(center_crop=224, size=32))
    by_fraction = preprocess_image(image, PreprocessConfig(center_crop=224 / 300, size=32))
    np.testing.assert_array_equal(by_pixels, by_fraction)


def test_channels_and_batch_shape():
    images = [noise(), noise(mode="RGB", seed=1)]
    rgb = preprocess_images(images, PreprocessConfig(channels=3, size=16))
    gray = preprocess_images(images, PreprocessConfig(channels=1, size=16))
    assert rgb.shape == (2, 3, 16, 16) and gray.shape == (2, 1, 16, 16)
    assert rgb.dtype == gray.dtype == torch.uint8
    assert torch.equal(rgb[0, 0], rgb[0, 2])
    assert preprocess_images([], PreprocessConfig(size=8)).shape == (0, 1, 8, 8)


def test_crop_larger_than_the_image_is_an_error():
    with pytest.raises(ValueError, match="center_crop 64 is larger than the 40x30 image"):
        preprocess_image(noise(), PreprocessConfig(center_crop=64))


@pytest.mark.parametrize("change", [{"channels": 2}, {"center_crop": 1.5}, {"center_crop": 0},
                                    {"size": 2}, {"resize": 64}])
def test_invalid_configs_are_refused(change):
    with pytest.raises(ValidationError):
        PreprocessConfig(**change)


def test_config_is_frozen_and_round_trips_json():
    cfg = PreprocessConfig(center_crop=0.75, equalize=True)
    with pytest.raises(ValidationError):
        cfg.size = 32
    assert PreprocessConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.fixture
def marked_dataset(tmp_path):
    """Each image is constant = 10 * its row, so alignment of tensors and rows is checkable."""
    rows = []
    for i, (split, label, kind) in enumerate(
        [("train", "normal", ""), ("train", "normal", ""), ("val", "abnormal", "nodule"),
         ("test", "normal", ""), ("test", "abnormal", "effusion"), ("test", "abnormal", "nodule")]
    ):
        path = f"images/{i}.png"
        (tmp_path / "ds" / "images").mkdir(parents=True, exist_ok=True)
        Image.new("L", (20, 20), 10 * i).save(tmp_path / "ds" / path)
        rows.append((path, label, split, f"g{i}", kind))
    write_manifest(pd.DataFrame(rows, columns=list(COLUMNS)), tmp_path / "ds")
    return tmp_path / "ds"


def test_dataset_rows_and_tensors_stay_aligned_through_subset(marked_dataset, tmp_path):
    data = preprocess_dataset(marked_dataset, PreprocessConfig(size=8), tmp_path / "cache", "v1")
    assert data.images.shape == (6, 1, 8, 8) and len(data) == 6
    assert data.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50]
    test = data.subset(split="test")
    assert test.images[:, 0, 0, 0].tolist() == [30, 40, 50]
    assert test.labels.tolist() == [0, 1, 1]
    nodules = data.subset(anomaly_types=["nodule"])
    assert nodules.manifest.path.tolist() == ["images/2.png", "images/5.png"]
    assert nodules.images[:, 0, 0, 0].tolist() == [20, 50]
    assert len(data.subset(split="train", label="normal")) == 2


def test_cache_hit_miss_and_key(marked_dataset, tmp_path):
    cache, cfg = tmp_path / "cache", PreprocessConfig(size=8)
    cold = preprocess_dataset(marked_dataset, cfg, cache, "v1")
    warm = preprocess_dataset(marked_dataset, cfg, cache, "v1")
    assert not cold.from_cache and warm.from_cache
    assert torch.equal(cold.images, warm.images)
    pd.testing.assert_frame_equal(cold.manifest, warm.manifest)
    assert not preprocess_dataset(marked_dataset, cfg, cache, "v2").from_cache
    assert not preprocess_dataset(marked_dataset, PreprocessConfig(size=16), cache, "v1").from_cache
    (marked_dataset / "images" / "0.png").unlink()
    write_manifest(cold.manifest.iloc[1:], marked_dataset)
    assert len(preprocess_dataset(marked_dataset, cfg, cache, "v1")) == 5
    assert len(list(cache.glob("*.pt"))) == 4 and not list(cache.glob("*.tmp"))


def test_decode_errors_propagate_with_the_file_name(marked_dataset, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"\d\.png: cannot preprocess \(center_crop 64 is larger"):
        preprocess_dataset(marked_dataset, PreprocessConfig(center_crop=64), cache, "v1")
    (marked_dataset / "images" / "3.png").write_bytes(b"corrupt")
    with pytest.raises(ImageReadError, match=r"3\.png: cannot decode"):
        preprocess_dataset(marked_dataset, PreprocessConfig(size=8), cache, "v1")
    assert not cache.exists() or not list(cache.iterdir())


def test_two_thousand_phantoms_generate_and_preprocess_fast(tmp_path):
    started = time.perf_counter()
    root = generate_phantoms(tmp_path / "ds", PhantomSpec())
    generated = time.perf_counter()
    data = preprocess_dataset(root, PreprocessConfig(), tmp_path / "cache", "v1")
    cold = time.perf_counter()
    again = preprocess_dataset(root, PreprocessConfig(), tmp_path / "cache", "v1")
    warm = time.perf_counter()
    assert data.images.shape == (2000, 1, 64, 64) and again.from_cache
    timings = {"generate": generated - started, "cold": cold - generated, "warm": warm - cold}
    print(f"2,000 phantoms: {timings}")
    assert timings["generate"] + timings["cold"] < 45, timings
    assert timings["warm"] < timings["cold"], timings
