"""Training and scoring throughput (images/s) of a preset on the current device, warm-up excluded.

    python benchmarks/train_throughput.py --preset nih_pa_wo_pg --iters 20
"""

from __future__ import annotations

import argparse
import time

import torch

from common import preset_dpa_config, random_images, sync
from model.scoring import score_images
from model.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--iters", type=int, default=10, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--score-images", type=int, default=512)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    overrides = {"stab_iters": args.warmup + args.iters, "device": args.device, "log_every": 10**9}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = preset_dpa_config(args.preset, **overrides)
    bs = cfg.train.batch_size
    trainer = Trainer(cfg, random_images(cfg, max(bs, 256)), progress=False)
    device = trainer.device
    trainer.fit(until=args.warmup)
    sync(device)
    start = time.perf_counter()
    trainer.fit(until=args.warmup + args.iters)
    sync(device)
    train_ips = args.iters * bs / (time.perf_counter() - start)

    dpa = trainer.dpa
    images = random_images(cfg, args.score_images, seed=1)
    score_images(dpa, images[: cfg.train.score_batch_size * 2], cfg.train.score_batch_size)
    sync(device)
    start = time.perf_counter()
    score_images(dpa, images, cfg.train.score_batch_size)
    sync(device)
    score_ips = len(images) / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    net = cfg.network
    print(f"preset={args.preset} device={name} res={net.max_res} channels={net.image_channels} batch={bs} "
          f"layers={cfg.loss.layers_at(net.max_res)} bf16={device.type == 'cuda' and cfg.train.bf16}")
    print(f"train_images_per_s={train_ips:.1f}  score_images_per_s={score_ips:.1f}")


if __name__ == "__main__":
    main()
