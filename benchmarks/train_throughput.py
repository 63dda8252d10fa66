"""Training throughput of a preset on the current device: images/s, ms/step, achieved TFLOP/s and,
on CUDA, the peak device memory.

One row per variant (feature cache on/off × compile on/off), warm-up excluded; FLOPs per step are
counted by torch.utils.flop_counter on one eager step of the same variant (forward + backward).
Started by torchrun, every rank trains its share of each batch through DDP and rank 0 prints the
figures of the whole job (images/s of the global batch, TFLOP/s summed over ranks). `--profile DIR`
also writes, per variant, torch.profiler's table of the busiest kernels over a few more steps and
the host (CPU) time per step: where the time of a step goes.

    python benchmarks/train_throughput.py --preset nih_pa_wo_pg --iters 20
    python benchmarks/train_throughput.py --preset demo --layer r32 --batch-size 64 --threads 2
    python benchmarks/train_throughput.py --preset nih_pa_wo_pg --batch-size 1024 --profile /tmp/prof
    torchrun --standalone --nproc-per-node 2 benchmarks/train_throughput.py --preset nih_pa_wo_pg
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common import preset_dpa_config, random_images, stored_res, sync
from model.distributed import World, process_group
from model.trainer import Trainer, select_device

CHOICES = {"on": [True], "off": [False], "both": [True, False]}
PROFILE_STEPS = 10


def measure(args: argparse.Namespace, world: World, cache: bool, compile_: bool) -> dict:
    profile_steps = PROFILE_STEPS if args.profile else 0
    overrides = {"iters": args.warmup + args.iters + 1 + profile_steps, "device": args.device, "log_every": 10**9,
                 "nproc_per_node": world.size}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if not cache:
        overrides["feature_cache_mb"] = 0
    if compile_:
        overrides["compile"] = True
    cfg = preset_dpa_config(args.preset, args.stage, args.layer, **overrides)
    bs = cfg.train.batch_size
    images = random_images(cfg, max(2 * bs, args.n_images), res=stored_res(args.preset))
    trainer = Trainer(cfg, images, progress=False)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.fit(until=args.warmup)  # includes building the cache and compiling
    sync(trainer.device)
    start = time.perf_counter()
    end = args.warmup + args.iters
    trainer.fit(until=end)
    sync(trainer.device)
    seconds = time.perf_counter() - start
    result = {
        "device": trainer.device, "cfg": cfg, "cache": cache and getattr(trainer, "cache", None) is not None,
        "compile": trainer._compiled_loss is not None,  # False where compile failed and training fell back
        "images_per_s": args.iters * bs / seconds, "ms_per_step": 1000 * seconds / args.iters,
        "max_mem_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if trainer.device.type == "cuda" else None,
    }
    if profile_steps:
        result["profile"] = profile_steps_table(trainer, end, profile_steps)
        end += profile_steps
    trainer._compiled_loss = None  # count the eager step: the same arithmetic
    with FlopCounterMode(display=False) as counter:
        trainer.fit(until=end + 1)
    result["tflops"] = world.size * counter.get_total_flops() / (result["ms_per_step"] / 1000) / 1e12
    return result


def profile_steps_table(trainer: Trainer, start: int, steps: int) -> str:
    """torch.profiler over `steps` more steps: the busiest kernels (device time on CUDA) and the
    host time per step, which tells a launch-bound step (host ≈ step time) from a compute-bound one."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    sync(trainer.device)
    wall = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.fit(until=start + steps)
        sync(trainer.device)
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    host_us = sum(e.self_cpu_time_total for e in events)
    head = (f"{steps} profiled steps: wall {1000 * wall / steps:.2f} ms/step (profiler on), "
            f"host (CPU self time) {host_us / 1000 / steps:.2f} ms/step; the device's total is the table's last line")
    return head + "\n" + events.table(sort_by=sort, row_limit=20, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--stage", choices=["stab", "trns"], default="stab", help="trns: the transition into max_res")
    parser.add_argument("--layer", default=None, help="replace the preset's loss layers, e.g. r32")
    parser.add_argument("--iters", type=int, default=20, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--n-images", type=int, default=1024, help="training set size (the cache covers it)")
    parser.add_argument("--cache", choices=CHOICES, default="on")
    parser.add_argument("--compile", choices=CHOICES, default="off")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", type=Path, default=None, help="write a profile table per variant into this folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        with process_group(select_device(args.device)) as world:
            report(args, world)
    else:
        report(args, World())


def report(args: argparse.Namespace, world: World) -> None:
    for compile_ in CHOICES[args.compile]:
        for cache in CHOICES[args.cache]:
            r = measure(args, world, cache, compile_)
            if not world.is_main:
                continue
            device = r["device"]
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu({torch.get_num_threads()}t)"
            net, cfg = r["cfg"].network, r["cfg"]
            memory = f" max_mem_gib={r['max_mem_gib']:.2f}" if r["max_mem_gib"] is not None else ""
            row = (f"preset={args.preset} stage={args.stage} device={name.replace(' ', '_')} ranks={world.size} "
                   f"res={net.max_res} batch={cfg.train.batch_size} layers={','.join(cfg.loss.layers_at(net.max_res))} "
                   f"bf16={device.type == 'cuda' and cfg.train.bf16} cache={r['cache']} compile={r['compile']} "
                   f"images_per_s={r['images_per_s']:.1f} ms_per_step={r['ms_per_step']:.2f} tflops={r['tflops']:.3f}{memory}")
            print(row, flush=True)
            if "profile" in r:
                args.profile.mkdir(parents=True, exist_ok=True)
                name = f"profile-{args.preset}-{args.stage}-b{cfg.train.batch_size}-cache{r['cache']}-compile{r['compile']}.txt"
                (args.profile / name).write_text(row + "\n" + r["profile"] + "\n")


if __name__ == "__main__":
    main()
