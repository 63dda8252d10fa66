"""The training gate's per-image rules, applied to one image at the door of scoring and serving.

The gate (`data_layer.validation`) asserts these facts through Great Expectations over a whole
dataset before anything trains; scoring and serving check each decoded image against the same
rules (the ones its model was trained under) before scoring it, so an image the gate would have
refused is refused with its reason, never scored. Decodability is checked by decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from data_layer.expectations import ValidationRules


class ImageRefused(ValueError):
    """A decoded image breaks one of the gate's rules; the message says which and what to do."""


def image_facts(image: Image.Image) -> dict[str, Any]:
    """What the per-image rules look at: channels, smallest side, pixel dtype and spread."""
    pixels = np.asarray(image)
    return {"channels": len(image.getbands()), "min_side": min(image.size), "dtype": pixels.dtype.name, "std": float(pixels.std())}


def check_image(image: Image.Image, rules: ValidationRules) -> None:
    """Raise `ImageRefused` for an image the training gate would refuse under `rules`."""
    facts = image_facts(image)
    allowed = (1, 3) if rules.expected_channels == "any" else (rules.expected_channels,)
    if facts["channels"] not in allowed:
        raise ImageRefused(
            f"refused: {facts['channels']} channel(s), but the model was trained on {rules.expected_channels}-channel "
            "images; convert it first"
        )
    if facts["min_side"] < rules.min_size:
        raise ImageRefused(
            f"refused: {image.width}x{image.height} px, below the {rules.min_size} px minimum side the model was trained "
            "with; score the full-resolution image"
        )
    if facts["std"] == 0:
        raise ImageRefused(
            f"refused: blank (one grey level, {int(np.asarray(image).flat[0])}), so there is nothing to score; "
            "re-export it from the source"
        )
