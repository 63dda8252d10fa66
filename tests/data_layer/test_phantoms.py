"""Synthetic chest X-ray phantoms: determinism, manifest shape, anomalies, the difficulty knob and the acquisition shift."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from data_layer.manifest import read_manifest
from data_layer.phantoms import (
    ANOMALY_TYPES,
    PhantomSpec,
    _Lesion,
    _Patient,
    _Pose,
    _render,
    generate_phantoms,
    render_phantom,
)

SMALL = PhantomSpec(n_train_normal=30, n_val_normal=6, n_test_normal=10, n_val_abnormal=8,
                    n_test_abnormal=12, size=32, seed=5, difficulty=0.3)


def digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = digest(generate_phantoms(tmp_path / "a", SMALL))
    assert first == digest(generate_phantoms(tmp_path / "b", SMALL))
    other = digest(generate_phantoms(tmp_path / "c", SMALL.model_copy(update={"seed": 6})))
    assert other != first


def test_manifest_counts_groups_and_anomaly_types(tmp_path):
    df = read_manifest(generate_phantoms(tmp_path / "d", SMALL))
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "normal"): 30, ("val", "normal"): 6, ("test", "normal"): 10,
                      ("val", "abnormal"): 8, ("test", "abnormal"): 12}
    assert df.groupby("group")["split"].nunique().max() == 1
    assert df.groupby("group")["label"].nunique().max() == 1
    assert df.groupby("group").size().max() <= SMALL.max_images_per_patient
    assert df.groupby("group").size().max() > 1
    assert set(df.loc[df.label == "normal", "anomaly_type"]) == {""}
    assert set(df.loc[df.label == "abnormal", "anomaly_type"]) == set(ANOMALY_TYPES)
    assert all((tmp_path / "d" / p).is_file() for p in df.path)
    assert all(p.startswith(f"images/{s}/") for p, s in zip(df.path, df.split))


def test_images_are_grayscale_sized_and_varied(tmp_path):
    root = generate_phantoms(tmp_path / "e", SMALL.model_copy(update={"size": 48}))
    images = [Image.open(root / p) for p in read_manifest(root).path[:8]]
    assert {(im.mode, im.size) for im in images} == {("L", (48, 48))}
    arrays = np.stack([np.asarray(im, dtype=float) for im in images])
    assert arrays.std(axis=(1, 2)).min() > 20
    assert np.abs(arrays[0] - arrays[1:]).mean() > 3


def test_existing_output_needs_overwrite(tmp_path):
    generate_phantoms(tmp_path / "f", SMALL)
    with pytest.raises(FileExistsError):
        generate_phantoms(tmp_path / "f", SMALL)
    assert generate_phantoms(tmp_path / "f", SMALL, overwrite=True) == tmp_path / "f"


def test_render_phantom_supports_256_pixels():
    image = render_phantom(np.random.default_rng(0), 256, "effusion", 0.0)
    assert image.shape == (256, 256) and image.dtype == np.uint8


@pytest.mark.parametrize(
    "change", [{"size": 300}, {"difficulty": 1.5}, {"anomaly_types": ("fracture",)},
               {"anomaly_types": ()}, {"n_train_normal": -1}],
)
def test_invalid_specs_are_refused(change):
    with pytest.raises(ValidationError):
        PhantomSpec(**(SMALL.model_dump() | change))


def lesion_effect(kind: str, difficulty: float, seed: int, size: int = 64) -> tuple[float, float]:
    """(mean |change|, share of pixels changed by > 2 grey levels) for one patient, same noise."""
    rng = np.random.default_rng(seed)
    patient, pose = _Patient.draw(rng), _Pose.draw(rng)
    lesion = _Lesion.draw(rng, patient, kind, difficulty)
    clean = _render(patient, pose, None, size, np.random.default_rng(99)).astype(float)
    sick = _render(patient, pose, lesion, size, np.random.default_rng(99)).astype(float)
    change = np.abs(sick - clean)
    return change.mean(), (change > 2).mean()


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_anomalies_are_local_and_fade_with_difficulty(kind):
    effects = [
        np.mean([lesion_effect(kind, d, seed) for seed in range(6)], axis=0) for d in (0.0, 0.5, 1.0)
    ]
    strengths = [mean for mean, _ in effects]
    assert strengths[0] > strengths[1] > strengths[2] > 0
    assert effects[0][1] < 0.35, "an anomaly should change a local region, not the whole image"


def pixels(kind: str, difficulty: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_phantom(rng, 32, kind, difficulty).ravel() / 255.0 for _ in range(n)])


def test_hard_setting_defeats_a_pixel_space_reconstruction_baseline():
    """PCA reconstruction error stands in for a pixel-space autoencoder: it separates obvious
    anomalies but is near chance at difficulty 1."""
    train = pixels("", 0.0, 200, seed=1)
    mean = train.mean(axis=0)
    basis = np.linalg.svd(train - mean, full_matrices=False)[2][:20]

    def error(x: np.ndarray) -> np.ndarray:
        centred = x - mean
        return ((centred - centred @ basis.T @ basis) ** 2).mean(axis=1)

    normal = error(pixels("", 0.0, 60, seed=2))
    labels = np.r_[np.zeros(60), np.ones(60)]
    auroc = {
        d: np.mean([roc_auc_score(labels, np.r_[normal, error(pixels(kind, d, 60, seed=3))])
                    for kind in ANOMALY_TYPES])
        for d in (0.0, 1.0)
    }
    assert auroc[0.0] > 0.8 and auroc[1.0] < 0.65, auroc



def test_another_acquisition_images_the_same_patients_with_less_contrast_and_more_noise(tmp_path):
    spec = SMALL.model_copy(update={"n_train_normal": 8, "n_val_normal": 0, "n_test_normal": 0, "n_val_abnormal": 0,
                                    "n_test_abnormal": 0})
    base = generate_phantoms(tmp_path / "base", spec)
    assert digest(generate_phantoms(tmp_path / "ones", spec.model_copy(update={"contrast_scale": 1.0, "noise_scale": 1.0}))) == digest(base)
    shifted = generate_phantoms(tmp_path / "shifted", spec.model_copy(update={"contrast_scale": 0.6, "noise_scale": 3.0}))
    assert (read_manifest(shifted) == read_manifest(base)).all().all()
    pixels = [np.stack([np.asarray(Image.open(root / p), dtype=float) for p in read_manifest(root).path]) for root in (base, shifted)]
    assert pixels[1].std(axis=(1, 2)).mean() < pixels[0].std(axis=(1, 2)).mean()  # flatter images
    noise = [np.abs(np.diff(images, axis=2)).mean() for images in pixels]  # pixel-to-pixel jitter
    assert noise[1] > noise[0]
