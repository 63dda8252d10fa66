"""ONNX Runtime (CPU) beside the pyfunc path, on the same images: images/s of each, their ratio, and
the largest relative score difference.

    python benchmarks/onnx_throughput.py                       # the demo preset's network, random weights
    python benchmarks/onnx_throughput.py --preset nih_pa_wo_pg --images 256 --batch 64

Both score the same preprocessed uint8 batches: the pyfunc path as `dpa score` and the REST server
run it (`model.scoring.score_images`, PyTorch fp32 on CPU, the DPAPyfuncModel's scoring step), and
the exported graph (`model.export`, what `dpa export` writes) in one onnxruntime.InferenceSession.
Decoding and resizing are left out of both: they are the same code before either. Speed does not
depend on the weights, so the network has seeded random ones and the script runs offline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import preset_serving_config, random_images

from model.dpa import DPA
from model.export import INPUT, SCORE, export_onnx
from model.scoring import score_images


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:  # noqa: ANN001 - any scoring callable
    fn()  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - started) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dpa_cfg, preprocess = preset_serving_config(args.preset)
    dpa = DPA.build(dpa_cfg).eval()
    images = random_images(dpa_cfg, args.images, res=preprocess.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(dpa, preprocess.channels, preprocess.size, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def onnx_scores() -> np.ndarray:
            return np.concatenate([session.run([SCORE], {INPUT: b.numpy()})[0] for b in images.split(args.batch)])

        pyfunc_s, reference = timed(lambda: score_images(dpa, images, args.batch).numpy(), args.repeats)
        onnx_s, exported = timed(onnx_scores, args.repeats)
    difference = float(np.max(np.abs(exported - reference) / np.abs(reference)))
    print(f"preset {args.preset}: {args.images} images of {preprocess.channels}x{preprocess.size}x{preprocess.size}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    print(f"| path | images/s |\n|---|---|\n| pyfunc (PyTorch fp32) | {args.images / pyfunc_s:,.1f} |\n"
          f"| ONNX Runtime CPU | {args.images / onnx_s:,.1f} |")
    print(f"ONNX Runtime / pyfunc: {pyfunc_s / onnx_s:.2f}x; max relative score difference {difference:.2g}")


if __name__ == "__main__":
    main()
