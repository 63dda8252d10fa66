"""GPU smoke check: a few DPA iterations on CUDA in bf16 (channels_last) against fp32.

Exits non-zero when CUDA is missing or bf16 losses/scores drift from fp32 beyond tolerance.

    python benchmarks/gpu_smoke.py --preset nih_pa_wo_pg --iters 20
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import preset_dpa_config, random_images, sync
from model.scoring import score_images
from model.trainer import Trainer


def run(preset: str, iters: int, bf16: bool) -> tuple[list[float], torch.Tensor, float]:
    cfg = preset_dpa_config(preset, stab_iters=iters, log_every=1, device="cuda", bf16=bf16)
    losses: list[float] = []
    trainer = Trainer(cfg, random_images(cfg, 4 * cfg.train.batch_size), callbacks=[lambda s: losses.append(s.loss)], progress=False)
    assert trainer.dpa.encoder.from_rgb[str(cfg.network.max_res)][0].weight.is_contiguous(memory_format=torch.channels_last)
    sync(trainer.device)
    start = time.perf_counter()
    dpa = trainer.fit()
    sync(trainer.device)
    elapsed = time.perf_counter() - start
    scores = score_images(dpa, random_images(cfg, 256, seed=1), cfg.train.score_batch_size)
    return losses, scores, iters * cfg.train.batch_size / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nih_pa_wo_pg")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--loss-rtol", type=float, default=0.05, help="max relative loss difference per step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available on this machine")
        return 2
    fp32_losses, fp32_scores, fp32_ips = run(args.preset, args.iters, bf16=False)
    bf16_losses, bf16_scores, bf16_ips = run(args.preset, args.iters, bf16=True)
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32_losses, bf16_losses)]
    corr = torch.corrcoef(torch.stack([fp32_scores, bf16_scores]))[0, 1].item()
    print(f"device={torch.cuda.get_device_name()} preset={args.preset} iters={args.iters}")
    print(f"fp32 loss first/last={fp32_losses[0]:.4f}/{fp32_losses[-1]:.4f} images/s={fp32_ips:.0f}")
    print(f"bf16 loss first/last={bf16_losses[0]:.4f}/{bf16_losses[-1]:.4f} images/s={bf16_ips:.0f}")
    print(f"max relative loss difference={max(rel):.4f} (tolerance {args.loss_rtol}); score correlation={corr:.4f}")
    ok = max(rel) <= args.loss_rtol and corr > 0.98
    print("OK" if ok else "FAILED: bf16 drifts from fp32")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
