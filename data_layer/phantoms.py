"""Synthetic chest X-ray phantoms: the offline, deterministic default dataset.

Each synthetic patient gets its own anatomy (thorax, lungs with vessel-like texture, ribs,
clavicles, heart, mediastinum and spine; position, scale, exposure and noise) and 1..N images
with small pose and exposure changes. Everything is drawn in patient coordinates
(x: -1 image left .. 1 image right, y: -1 top .. 1 bottom) and rendered with vectorised numpy at
any size, so an image looks the same at 64 or 256 pixels.

Anomalies are density changes inside a lung: `nodule`, `consolidation`, `effusion`,
`pneumothorax`. `difficulty` in [0, 1] shrinks their contrast and size: 0 is obvious,
1 is barely visible under the texture and noise. Every patient draws from its own seeded
generator, so the same spec gives byte-identical PNGs and manifest (and the same DVC hash).

`contrast_scale` and `noise_scale` simulate another acquisition (scanner, protocol): they scale
every patient's contrast and noise after the patient is drawn, so the same seed gives the same
patients imaged differently (a shifted batch for drift checks); at 1.0 nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.ndimage import map_coordinates

from data_layer.images import write_png
from data_layer.manifest import (
    ABNORMAL,
    ANOMALY_TYPE,
    GROUP,
    LABEL,
    NORMAL,
    PATH,
    SPLIT,
    SPLITS,
    staged_dataset,
    write_manifest,
)

ANOMALY_TYPES = ("nodule", "consolidation", "effusion", "pneumothorax")
_TEXTURE_EXTENT = 1.3
"""Half-width of the texture field in its own coordinates (reads beyond it are mirrored)."""


class PhantomSpec(BaseModel):
    """What to generate. Counts are images; a patient's 1..max_images_per_patient images share
    one split and label (abnormal patients show the same lesion in each image)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_train_normal: int = Field(1200, ge=0)
    n_val_normal: int = Field(200, ge=0)
    n_test_normal: int = Field(300, ge=0)
    n_val_abnormal: int = Field(100, ge=0)
    n_test_abnormal: int = Field(200, ge=0)
    size: int = Field(64, ge=16, le=256)
    seed: int = 0
    difficulty: float = Field(0.5, ge=0.0, le=1.0)
    anomaly_types: tuple[str, ...] = ANOMALY_TYPES
    max_images_per_patient: int = Field(3, ge=1)
    contrast_scale: float = Field(1.0, gt=0.0)
    noise_scale: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _known_anomaly_types(self) -> PhantomSpec:
        unknown = sorted(set(self.anomaly_types) - set(ANOMALY_TYPES))
        if unknown:
            raise ValueError(f"unknown anomaly_types {unknown}; choose from {ANOMALY_TYPES}")
        if not self.anomaly_types and self.n_val_abnormal + self.n_test_abnormal:
            raise ValueError("abnormal images requested but anomaly_types is empty")
        return self


def generate_phantoms(out_dir: str | Path, spec: PhantomSpec, overwrite: bool = False) -> Path:
    """Write `images/<split>/<id>.png` and `manifest.csv` into `out_dir`; return `out_dir`."""
    rows = []
    with staged_dataset(out_dir, overwrite) as stage:
        for split, label, count in _buckets(spec):
            for row, image in _render_bucket(spec, split, label, count):
                write_png(Image.fromarray(image, mode="L"), stage / row[PATH])
                rows.append(row)
        write_manifest(pd.DataFrame(rows), stage)
    return Path(out_dir)


def render_phantom(
    rng: np.random.Generator, size: int, anomaly: str = "", difficulty: float = 0.5
) -> np.ndarray:
    """One uint8 image of a new random patient (handy for notebooks and tests)."""
    patient = _Patient.draw(rng)
    lesion = _Lesion.draw(rng, patient, anomaly, difficulty) if anomaly else None
    return _render(patient, _Pose.draw(rng), lesion, size, rng)


def _buckets(spec: PhantomSpec) -> list[tuple[str, str, int]]:
    return [
        ("train", NORMAL, spec.n_train_normal),
        ("val", NORMAL, spec.n_val_normal),
        ("test", NORMAL, spec.n_test_normal),
        ("val", ABNORMAL, spec.n_val_abnormal),
        ("test", ABNORMAL, spec.n_test_abnormal),
    ]


def _render_bucket(
    spec: PhantomSpec, split: str, label: str, count: int
) -> Iterator[tuple[dict[str, str], np.ndarray]]:
    """Yield (manifest row, image) for `count` images of one split/label, patient by patient."""
    bucket = (SPLITS.index(split), int(label == ABNORMAL))
    made, patient_index = 0, 0
    while made < count:
        rng = np.random.default_rng([spec.seed, *bucket, patient_index])
        group = f"{split}-{label}-{patient_index:05d}"
        anomaly = spec.anomaly_types[patient_index % len(spec.anomaly_types)] if bucket[1] else ""
        patient = _acquired(_Patient.draw(rng), spec)
        lesion = _Lesion.draw(rng, patient, anomaly, spec.difficulty) if anomaly else None
        n_images = min(int(rng.integers(1, spec.max_images_per_patient + 1)), count - made)
        for image_index in range(n_images):
            image = _render(patient, _Pose.draw(rng), lesion, spec.size, rng)
            row = {
                PATH: f"images/{split}/{group}-{image_index}.png",
                LABEL: label,
                SPLIT: split,
                GROUP: group,
                ANOMALY_TYPE: anomaly,
            }
            yield row, image
        made += n_images
        patient_index += 1


def _acquired(patient: _Patient, spec: PhantomSpec) -> _Patient:
    """The patient as another acquisition images it (x * 1.0 is exact: the defaults change no byte)."""
    return replace(patient, contrast=patient.contrast * spec.contrast_scale, noise=patient.noise * spec.noise_scale)


@dataclass(frozen=True)
class _Patient:
    """Anatomy and typical exposure of one synthetic patient."""

    shift: np.ndarray
    scale: float
    aspect: float
    lung_x: float
    lung_y: float
    lung_w: float
    lung_h: float
    dome: float
    heart: tuple[float, float, float, float]
    rib_spacing: float
    rib_phase: float
    rib_slope: float
    texture: np.ndarray
    contrast: float
    gamma: float
    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Patient:
        return cls(
            shift=rng.normal(0.0, 0.035, 2),
            scale=rng.uniform(0.86, 1.02),
            aspect=rng.uniform(0.94, 1.08),
            lung_x=rng.uniform(0.37, 0.42),
            lung_y=rng.uniform(-0.1, -0.02),
            lung_w=rng.uniform(0.27, 0.32),
            lung_h=rng.uniform(0.56, 0.64),
            dome=rng.uniform(0.1, 0.18),
            heart=(rng.uniform(0.07, 0.13), rng.uniform(0.24, 0.3),
                   rng.uniform(0.27, 0.33), rng.uniform(0.19, 0.24)),
            rib_spacing=rng.uniform(0.15, 0.19),
            rib_phase=rng.uniform(0.0, 1.0),
            rib_slope=rng.uniform(0.55, 0.8),
            texture=_texture_field(rng),
            contrast=rng.uniform(0.85, 1.15),
            gamma=rng.uniform(0.8, 1.25),
            noise=rng.uniform(0.01, 0.025),
        )


@dataclass(frozen=True)
class _Pose:
    """Small per-image changes: the same patient positioned and exposed a bit differently."""

    shift: np.ndarray
    angle: float
    exposure: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Pose:
        return cls(rng.normal(0.0, 0.015, 2), rng.normal(0.0, 0.03), rng.normal(0.0, 0.03))


@dataclass(frozen=True)
class _Lesion:
    """An anomaly in patient coordinates, so it moves with the patient between images."""

    kind: str
    side: int
    centers: np.ndarray
    """Nodule centres, or the lobules of a consolidation (unused by the other kinds)."""
    radius: float
    amplitude: float

    @classmethod
    def draw(
        cls, rng: np.random.Generator, patient: _Patient, kind: str, difficulty: float
    ) -> _Lesion:
        side = int(rng.choice([-1, 1]))
        radius_ends, amplitude_ends = _LESION_SCALE[kind]
        radius = _lerp(radius_ends, difficulty) * rng.uniform(0.85, 1.15)
        if kind == "nodule":
            spots = int(rng.integers(1, 4))
            centers = np.array([_point_in_lung(rng, patient, side) for _ in range(spots)])
        else:
            lobules = np.vstack([np.zeros((1, 2)), rng.normal(0.0, 0.4 * radius, (3, 2))])
            centers = np.array(_point_in_lung(rng, patient, side)) + lobules
        amplitude = _lerp(amplitude_ends, difficulty) * rng.uniform(0.85, 1.15)
        return cls(kind, side, centers, radius, amplitude)


_LESION_SCALE = {
    # kind: ((radius at difficulty 0, at 1), (amplitude at 0, at 1))
    "nodule": ((0.08, 0.035), (0.45, 0.05)),
    "consolidation": ((0.2, 0.09), (0.35, 0.045)),
    "effusion": ((0.45, 0.12), (0.5, 0.06)),
    "pneumothorax": ((0.45, 0.14), (0.35, 0.05)),
}


def _lerp(ends: tuple[float, float], t: float) -> float:
    return ends[0] + (ends[1] - ends[0]) * t


def _point_in_lung(rng: np.random.Generator, patient: _Patient, side: int) -> tuple[float, float]:
    while True:
        x = side * patient.lung_x + rng.uniform(-0.6, 0.6) * patient.lung_w
        y = patient.lung_y + rng.uniform(-0.6, 0.45) * patient.lung_h
        if _lung(patient, np.array(x), np.array(y), side) > 0.9:
            return x, y


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _lung(patient: _Patient, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Soft mask of one lung: a rounded field cut by a hemidiaphragm dome (sharp lateral angle)."""
    u = (x - side * patient.lung_x) / patient.lung_w
    v = (y - patient.lung_y) / patient.lung_h
    field = _sigmoid((1.0 - (np.abs(u) ** 2.4 + np.abs(v) ** 2.2)) / 0.08)
    base = patient.lung_y + 0.8 * patient.lung_h - (0.04 if side < 0 else 0.0)
    dome_top = base - patient.dome * (1.0 - np.clip(u, -1, 1) ** 2)
    return field * _sigmoid((dome_top - y) / 0.015)


def _texture_field(rng: np.random.Generator, n: int = 96) -> np.ndarray:
    """Vessel-like ridges: band-passed noise folded at zero, sharpened; values in [0, 1]."""
    freq = np.fft.fftfreq(n) * n / (2 * _TEXTURE_EXTENT)
    radius = np.hypot(*np.meshgrid(freq, freq, indexing="ij"))
    band = np.exp(-(((radius - 5.0) / 2.5) ** 2))
    noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * band).real
    ridges = 1.0 - np.abs(noise) / (np.abs(noise).max() + 1e-9)
    return ridges**4


def _render(
    patient: _Patient, pose: _Pose, lesion: _Lesion | None, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Density map in patient coordinates -> exposure -> noise -> uint8."""
    x, y = _patient_coordinates(patient, pose, size)
    density = _anatomy(patient, x, y, lesion)
    if lesion is not None:
        density += _lesion_density(patient, lesion, x, y)
    exposure = patient.contrast * (1.0 + pose.exposure)
    image = (1.0 - np.exp(-1.8 * exposure * np.clip(density, 0.0, None))) / (1.0 - np.exp(-1.8))
    image = np.clip(image, 0.0, 1.0) ** patient.gamma
    image += rng.normal(0.0, patient.noise, image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _patient_coordinates(
    patient: _Patient, pose: _Pose, size: int
) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    gx, gy = np.meshgrid(axis, axis)
    gx, gy = gx - patient.shift[0] - pose.shift[0], gy - patient.shift[1] - pose.shift[1]
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    x = (cos * gx + sin * gy) / (patient.scale * patient.aspect)
    y = (-sin * gx + cos * gy) / patient.scale
    return x, y


def _anatomy(patient: _Patient, x: np.ndarray, y: np.ndarray, lesion: _Lesion | None) -> np.ndarray:
    ax = np.abs(x)
    half_width = 0.92 - 0.12 * np.clip(-0.75 - y, 0, None)
    thickness = np.sqrt(np.clip(1.0 - (x / half_width) ** 2, 0.0, 1.0))
    body = 0.55 * thickness * _sigmoid((1.05 - y) / 0.05)
    texture = _vessels(patient, x, y)
    if lesion is not None and lesion.kind in ("pneumothorax", "effusion"):
        texture = texture * (1.0 - _texture_loss(patient, lesion, x, y))
    mediastinum_half_width = 0.13 + 0.05 * _sigmoid((y - 0.1) / 0.1)
    mediastinum = _sigmoid((mediastinum_half_width - ax) / 0.02) * _sigmoid((0.6 - y) / 0.05)
    spine = _sigmoid((0.065 - ax) / 0.01) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.11) ** 2)
    trachea = _sigmoid((0.03 - ax) / 0.008) * _sigmoid((-0.35 - y) / 0.03)
    heart_x, heart_y, heart_w, heart_h = patient.heart
    heart = _sigmoid((1.0 - ((x - heart_x) / heart_w) ** 2 - ((y - heart_y) / heart_h) ** 2) / 0.12)
    lung = np.maximum(_lung(patient, x, y, -1), _lung(patient, x, y, 1)) * (1.0 - 0.75 * heart)
    return (
        body
        - 0.38 * lung
        + 0.2 * lung * texture
        + 0.12 * heart * thickness
        + 0.14 * mediastinum
        + 0.1 * spine
        - 0.1 * trachea
        + _bones(patient, x, y, ax)
    )


def _bones(patient: _Patient, x: np.ndarray, y: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """Posterior ribs (bright bands falling laterally), fainter anterior ribs and clavicles."""
    cage = (
        _sigmoid((ax - 0.07) / 0.02)
        * _sigmoid((0.84 - ax) / 0.03)
        * _sigmoid((0.5 + 0.2 * ax - y) / 0.04)
        * _sigmoid((y + 0.88) / 0.04)
    )
    phase = (y - patient.rib_slope * (ax - 0.1) ** 2) / patient.rib_spacing + patient.rib_phase
    posterior = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6
    anterior = (0.5 + 0.5 * np.cos(2 * np.pi * (y + 0.35 * ax) / (1.4 * patient.rib_spacing))) ** 6
    clavicle_y = -0.74 + 0.1 * ax - 0.35 * (ax - 0.4) ** 2
    clavicle = np.exp(-(((y - clavicle_y) / 0.03) ** 2)) * _sigmoid((0.75 - ax) / 0.03) * (ax > 0.07)
    return cage * (0.1 * posterior + 0.03 * anterior) + 0.12 * clavicle


def _vessels(patient: _Patient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vessel markings: the texture field read in polar coordinates around each hilum, so its
    ridges run outwards like vessels, strongest at the hila and fading to the periphery."""
    dx = np.abs(x) - 0.06
    dy = y - (patient.lung_y + 0.02)
    radius = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx)
    scale = (patient.texture.shape[0] - 1) / (2 * _TEXTURE_EXTENT)
    rows = (0.55 * angle + _TEXTURE_EXTENT) * scale
    cols = (0.8 * radius + 0.9 * (x < 0) - 0.45 + _TEXTURE_EXTENT) * scale
    ridges = map_coordinates(patient.texture, np.stack([rows, cols]), order=1, mode="reflect")
    return ridges * (0.35 + 0.9 * np.exp(-((radius / 0.35) ** 2)))


def _lesion_density(patient: _Patient, lesion: _Lesion, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    lung = _lung(patient, x, y, lesion.side)
    if lesion.kind == "effusion":
        return lesion.amplitude * _fluid(patient, lesion, x, y)
    if lesion.kind == "pneumothorax":
        rim, pleural_line = _pneumothorax(patient, lesion, x, y)
        return lesion.amplitude * (pleural_line - 0.35 * rim) * lung
    offsets = [(x - cx, y - cy) for cx, cy in lesion.centers]
    if lesion.kind == "nodule":
        spots = [np.clip(1 - (dx**2 + dy**2) / lesion.radius**2, 0, None) ** 1.5 for dx, dy in offsets]
        return lesion.amplitude * np.max(spots, axis=0) * lung
    blobs = [np.exp(-(dx**2 + dy**2) / lesion.radius**2) for dx, dy in offsets]
    return lesion.amplitude * np.clip(np.sum(blobs, axis=0), 0.0, 1.0) * lung


def _texture_loss(patient: _Patient, lesion: _Lesion, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where vessel markings vanish: under pleural fluid, or in the air rim of a pneumothorax."""
    if lesion.kind == "effusion":
        return _fluid(patient, lesion, x, y)
    return _pneumothorax(patient, lesion, x, y)[0]


def _fluid(patient: _Patient, lesion: _Lesion, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fluid filling the lower hemithorax, its surface climbing the lateral wall (meniscus)."""
    u = (x - lesion.side * patient.lung_x) / patient.lung_w
    lateral = np.clip((lesion.side * u + 1.0) / 2.0, 0.0, 1.0)
    base = patient.lung_y + 0.8 * patient.lung_h
    surface = base - lesion.radius * patient.lung_h * (1.0 + 0.8 * lateral**2)
    hemithorax = _sigmoid((1.05 - np.abs(u)) / 0.08) * _sigmoid((base + 0.12 - y) / 0.03)
    return _sigmoid((y - surface) / 0.02) * hemithorax


def _pneumothorax(
    patient: _Patient, lesion: _Lesion, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(air rim, pleural line): a crescent along the apical and lateral lung border, bounded by a
    thin bright line where the collapsed lung now ends."""
    u = (x - lesion.side * patient.lung_x) / patient.lung_w
    v = (y - patient.lung_y) / patient.lung_h
    border_distance = np.hypot(u, v) - (1.0 - 0.6 * lesion.radius)
    apical_lateral = _sigmoid((lesion.side * u - 0.3 * v + 0.1) / 0.1)
    rim = _sigmoid(border_distance / 0.02) * apical_lateral
    pleural_line = np.exp(-((border_distance / 0.025) ** 2)) * apical_lateral
    return rim, pleural_line
