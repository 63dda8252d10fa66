"""Load test of a served DPA: `mlflow models serve` on 127.0.0.1, a bounded load from client threads,
latency percentiles per batch size, images/s, errors and the server's memory.

    python benchmarks/serve_load.py                      # an untrained demo-preset DPA, temporary MLflow store
    python benchmarks/serve_load.py --preset nih_pa_wo_pg
    MLFLOW_TRACKING_URI=... python benchmarks/serve_load.py --model-uri models:/dpa-phantoms@champion
    python benchmarks/serve_load.py --url http://127.0.0.1:5000 --server-pid 1234   # a server already running

Without --model-uri the script logs an untrained DPA of --preset (random weights, so offline and in
seconds: serving speed does not depend on the weights) into a temporary MLflow store and serves
that. Each client thread first sends one request of every batch size (the warm-up, untimed); the
load then sends --requests requests, cycling through --batch-sizes, each image a distinct random
--image-size PNG (the server decodes and resizes it as it would a client's file).

Memory is the resident set size of the server's process tree (psutil) at start, after the warm-up
and after the load. Exit status 1 when any request failed or the RSS grew by more than
--max-growth-mb from after the warm-up to after the load (a leak, not the first allocations).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from tasks.runtime.servers import Server, start_server

MB = 2**20


@dataclass(frozen=True)
class Answer:
    batch: int
    status: int
    seconds: float
    error: str = ""


def main() -> int:
    args = parse_args()
    with ExitStack() as stack:
        url, pid = args.url, args.server_pid
        if url is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
            server = start(args, tmp)
            stack.callback(server.stop)
            url, pid = server.url, server.process.pid
        payloads = {batch: request_body(batch, args.image_size, seed=batch) for batch in args.batch_sizes}
        memory = {"at start": rss_mb(pid)}
        run_load(url, payloads, [b for _ in range(args.clients) for b in args.batch_sizes], args.clients, args.timeout)
        memory["after warm-up"] = rss_mb(pid)
        start_time = time.perf_counter()
        answers = run_load(url, payloads, [args.batch_sizes[i % len(args.batch_sizes)] for i in range(args.requests)],
                           args.clients, args.timeout)
        wall = time.perf_counter() - start_time
        memory["after the load"] = rss_mb(pid)
    return report(args, url, answers, wall, memory)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="a registered DPA (MLFLOW_TRACKING_URI names its store); default: an untrained --preset DPA")
    parser.add_argument("--preset", default="demo", help="the architecture of the default model (default: demo)")
    parser.add_argument("--url", help="an already running server (nothing is started); memory needs --server-pid")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's process, for its memory")
    parser.add_argument("--requests", type=int, default=1000, help="requests of the timed load (default: 1000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (default: 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="images per request, cycled (default: 1 64)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the PNGs sent, in pixels (default: 128)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the started server (default: 1)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a request may take before it counts as failed")
    parser.add_argument("--max-growth-mb", type=float, default=256,
                        help="allowed RSS growth from after the warm-up to after the load, MiB (default: 256)")
    args = parser.parse_args()
    if args.server_pid and not args.url:
        parser.error("--server-pid goes with --url")
    return args


def start(args: argparse.Namespace, tmp: Path) -> Server:
    """`mlflow models serve` of --model-uri, or of an untrained --preset DPA logged into `tmp`."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # it execs `uvicorn` by name
           "DPA_SERVE_MAX_ROWS": str(max(256, *args.batch_sizes))}
    model_uri = args.model_uri
    if model_uri is None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        model_uri = log_untrained(args.preset, env["MLFLOW_TRACKING_URI"], tmp)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "-h", "{host}", "-p", "{port}",
               "--env-manager", "local", "-w", str(args.workers)]
    print(f"starting mlflow models serve -m {model_uri} ({args.workers} worker(s)) ...", flush=True)
    return start_server(command, "/ping", env=env, timeout=600, log_file=tmp / "server.log")


def log_untrained(preset: str, tracking_uri: str, tmp: Path) -> str:
    """Register an untrained DPA of `preset` (random weights); its model URI."""
    # imported here: a run against --url needs none of them, and they take seconds to import
    import mlflow
    import torch
    from common import preset_serving_config

    from data_layer.expectations import ValidationRules
    from model.dpa import DPA
    from model.scoring import score_images
    from tasks.registry.mlflow_model import log_dpa_model

    dpa_cfg, preprocess = preset_serving_config(preset)
    dpa = DPA.build(dpa_cfg)
    images = torch.randint(0, 256, (8, preprocess.channels, preprocess.size, preprocess.size),
                           generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    normals = score_images(dpa, images).tolist()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve-load", artifact_location=(tmp / "artifacts").as_uri()))
    with mlflow.start_run():
        info = log_dpa_model(dpa, preprocess, max(normals), "serve-load", "untrained: max of 8 random images",
                             normal_scores=normals, normal_source="random images", quantile=1.0,
                             input_rules=ValidationRules())
    return f"models:/serve-load/{info.registered_model_version}"


def request_body(batch: int, size: int, seed: int) -> bytes:
    """A JSON request of `batch` distinct random grey PNGs."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(batch):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(buffer, format="PNG")
        cells.append([base64.b64encode(buffer.getvalue()).decode("ascii")])
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": cells}}).encode()


def run_load(url: str, payloads: dict[int, bytes], batches: list[int], clients: int, timeout: float) -> list[Answer]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda batch: send(url, batch, payloads[batch], timeout), batches))


def send(url: str, batch: int, body: bytes, timeout: float) -> Answer:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            rows = len(json.load(response)["predictions"])
            error = "" if rows == batch else f"{rows} predictions for {batch} images"
            return Answer(batch, response.status if not error else 0, time.perf_counter() - start, error)
    except urllib.error.HTTPError as exc:
        return Answer(batch, exc.code, time.perf_counter() - start, exc.read().decode(errors="replace")[:300])
    except (OSError, ValueError) as exc:  # refused, reset, timed out, not JSON
        return Answer(batch, 0, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of the process and all its descendants (the server forks uvicorn), MiB."""
    if pid is None:
        return None
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / MB


def report(args: argparse.Namespace, url: str, answers: list[Answer], wall: float, memory: dict[str, float | None]) -> int:
    """Print the figures; 1 when a request failed or memory grew beyond the bound, else 0."""
    ok = [a for a in answers if a.status == 200]
    images = sum(a.batch for a in ok)
    print(f"server {url}: {args.requests} requests from {args.clients} clients, batch sizes {args.batch_sizes}, "
          f"{args.image_size}x{args.image_size} PNGs; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>6} {'requests':>9} {'errors':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")
    for batch in args.batch_sizes:
        mine = [a for a in answers if a.batch == batch]
        seconds = np.array([a.seconds for a in mine if a.status == 200]) * 1000
        p50, p95, p99 = np.percentile(seconds, [50, 95, 99]) if seconds.size else (float("nan"),) * 3
        print(f"{batch:>6} {len(mine):>9} {len(mine) - seconds.size:>7} {p50:>9.1f} {p95:>9.1f} {p99:>9.1f}")
    print(f"wall {wall:.1f} s: {len(ok) / wall:.1f} requests/s, {images / wall:.1f} images/s")
    failures = [a for a in answers if a.status != 200]
    for status, count in Counter(a.status for a in failures).items():
        first = next(a for a in failures if a.status == status)
        print(f"errors: {count} answered {status or 'no HTTP status'}; first: {first.error}")
    growth = None
    if memory["at start"] is not None:
        growth = memory["after the load"] - memory["after warm-up"]
        print("server RSS: " + ", ".join(f"{mb:,.0f} MiB {when}" for when, mb in memory.items())
              + f" (growth under load {growth:+,.0f} MiB; bound {args.max_growth_mb:,.0f} MiB)")
    verdict = []
    if failures:
        verdict.append(f"{len(failures)} failed requests")
    if growth is not None and growth > args.max_growth_mb:
        verdict.append(f"memory grew {growth:,.0f} MiB > {args.max_growth_mb:,.0f} MiB")
    print(f"FAIL: {'; '.join(verdict)}" if verdict else "OK: no errors" + (", memory within the bound" if growth is not None else ""))
    return 1 if verdict else 0


if __name__ == "__main__":
    sys.exit(main())
