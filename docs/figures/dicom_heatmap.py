"""Renders docs/dicom-heatmap.png, the README's picture of a heat-map Secondary Capture.

Abnormal test phantoms of the demo's production dataset are wrapped as DICOM images of a made-up
patient, scored by the demo champion with `--dicom-out`, and the written Secondary Captures' pixel
data (what a viewer shows) are put side by side with the images as displayed.

    .venv/bin/python docs/figures/dicom_heatmap.py      # after `make demo`
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw

from data_layer.images import read_image
from data_layer.manifest import ABNORMAL, LABEL, PATH, SPLIT, read_manifest
from tasks.paths import project_dir
from tasks.registry.tracking import configure_tracking
from tasks.serving.scoring import score_inputs

MODEL = "models:/dpa-phantoms@champion"
FIGURE = Path(__file__).resolve().parents[1] / "dicom-heatmap.png"
SHOWN, SCALE = 3, 4


def as_dicom(png: Path, target: Path) -> None:
    pixels = np.asarray(read_image(png).convert("L"))
    image = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=hd.UID(), series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="phantom generator", patient_id="PHANTOM-1", patient_name="Phantom^Demo",
        patient_orientation=("L", "F"),
    )
    image.save_as(target, enforce_file_format=True)


def main() -> None:
    configure_tracking()
    data = project_dir() / "data"
    manifest = read_manifest(data)
    abnormal = manifest[(manifest[SPLIT] == "test") & (manifest[LABEL] == ABNORMAL)].head(SHOWN)
    with tempfile.TemporaryDirectory() as tmp:
        inbox, dicom = Path(tmp) / "inbox", Path(tmp) / "dicom"
        inbox.mkdir()
        for i, path in enumerate(abnormal[PATH]):
            as_dicom(data / path, inbox / f"IM{i:04d}")
        score_inputs(MODEL, str(inbox), str(Path(tmp) / "scores"), heatmaps=False, dicom_out=str(dicom))
        pairs = [(np.asarray(read_image(inbox / f"IM{i:04d}").convert("RGB")),
                  pydicom.dcmread(dicom / f"IM{i:04d}.heatmap.dcm").pixel_array) for i in range(len(abnormal))]
    rows = [np.concatenate([shown, capture], axis=1) for shown, capture in pairs]
    figure = Image.fromarray(np.concatenate(rows, axis=0))
    figure = figure.resize((figure.width * SCALE, figure.height * SCALE), Image.Resampling.NEAREST)
    ImageDraw.Draw(figure).text((4, 2), "as displayed | heat-map Secondary Capture", fill=(255, 255, 0))
    figure.save(FIGURE)
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
    main()
