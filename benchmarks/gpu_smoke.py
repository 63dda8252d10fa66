"""GPU smoke check: a few DPA iterations on CUDA in bf16 (channels_last) against fp32, and a hunt
for host syncs inside the training step (eager and compiled).

Exits non-zero when bf16 losses/scores drift from fp32 beyond tolerance or a step synchronises
with the host. Without CUDA (or with --device cpu, for testing the script) bf16 is off and there
is no sync to hunt: the comparison then checks only that two runs agree.

    python benchmarks/gpu_smoke.py --preset nih_pa_wo_pg --iters 20
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings

import torch

from common import preset_dpa_config, random_images, sync
from model.scoring import score_images
from model.trainer import Trainer


def run(preset: str, iters: int, device: str, bf16: bool) -> tuple[list[float], torch.Tensor, float]:
    cfg = preset_dpa_config(preset, iters=iters, log_every=1, device=device, bf16=bf16)
    losses: list[float] = []
    trainer = Trainer(cfg, random_images(cfg, 4 * cfg.train.batch_size), callbacks=[lambda s: losses.append(s.loss)], progress=False)
    assert trainer.dpa.encoder.from_rgb[str(cfg.network.max_res)][0].weight.is_contiguous(memory_format=torch.channels_last)
    sync(trainer.device)
    start = time.perf_counter()
    dpa = trainer.fit()
    sync(trainer.device)
    elapsed = time.perf_counter() - start
    scores = score_images(dpa, contrast_ramp(random_images(cfg, 256, seed=1)), cfg.train.score_batch_size)
    return losses, scores, iters * cfg.train.batch_size / elapsed


def contrast_ramp(images: torch.Tensor) -> torch.Tensor:
    """Unseen noise images whose contrast rises from 10% to 100%: scores with a real spread. On
    noise like the training set's alone, every score is nearly the same, and their correlation
    measures rounding, not agreement."""
    amplitude = torch.linspace(0.1, 1.0, len(images)).view(-1, 1, 1, 1)
    return (128 + amplitude * (images.float() - 128)).round().clamp(0, 255).to(torch.uint8)


def host_syncs(preset: str, compile_: bool, steps: int = 12) -> list[str]:
    """The distinct call stacks of every synchronising CUDA call in `steps` training steps (after
    warm-up; the epoch boundary, 8 steps in, falls inside), under torch.cuda.set_sync_debug_mode."""
    cfg = preset_dpa_config(preset, iters=3 + steps, device="cuda", log_every=10**9, compile=compile_)
    trainer = Trainer(cfg, random_images(cfg, 8 * cfg.train.batch_size), progress=False)
    trainer.fit(until=3)  # cudnn autotuning, the cache build and compiling may sync: not the steady state
    stage = trainer.stages[0]
    found: dict[str, None] = {}
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: found.setdefault("".join(traceback.format_stack(limit=9)[:-2]))
        try:
            for _ in range(steps):
                trainer._step(stage)
                trainer._advance(stage)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return list(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nih_pa_wo_pg")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--loss-rtol", type=float, default=0.05, help="max relative loss difference per step")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine")
        return 2
    fp32_losses, fp32_scores, fp32_ips = run(args.preset, args.iters, args.device, bf16=False)
    bf16_losses, bf16_scores, bf16_ips = run(args.preset, args.iters, args.device, bf16=True)
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32_losses, bf16_losses)]
    corr = torch.corrcoef(torch.stack([fp32_scores, bf16_scores]))[0, 1].item()
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device={name} preset={args.preset} iters={args.iters}")
    print(f"fp32 loss first/last={fp32_losses[0]:.4f}/{fp32_losses[-1]:.4f} images/s={fp32_ips:.0f}")
    print(f"bf16 loss first/last={bf16_losses[0]:.4f}/{bf16_losses[-1]:.4f} images/s={bf16_ips:.0f}")
    score_rel = ((bf16_scores - fp32_scores).abs() / fp32_scores.abs()).max().item()
    print(f"max relative loss difference={max(rel):.4f} (tolerance {args.loss_rtol}); score correlation={corr:.4f}; "
          f"max relative score difference={score_rel:.4f}")
    ok = max(rel) <= args.loss_rtol and corr > 0.98
    print("OK: bf16 agrees with fp32" if ok else "FAILED: bf16 drifts from fp32", flush=True)
    if args.device == "cuda":
        for compile_ in (False, True):
            stacks = host_syncs(args.preset, compile_)
            print(f"host syncs in the training step (compile={compile_}): {len(stacks)} distinct call sites", flush=True)
            for stack in stacks:
                print(stack)
            ok = ok and not stacks
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
