"""Training on N processes: torchrun starts N ranks of this module, which train with DDP
(model.distributed) and hand their results back through files in a work folder.

The training task writes the images, the configuration and the initial DPA there (built once,
so N ranks neither rebuild nor download VGG19 weights at the same time) and follows the folder while
torchrun runs: rank 0 appends each logged step to `curve.jsonl`, which the parent passes to its
callbacks (MLflow logging stays in the parent process), checkpoints where a 1-process run would,
and writes the trained DPA to `dpa.pt`. A rank that fails leaves its error and traceback in
torchrun's error file, which the parent raises as `RankFailed`. A stop signal to the parent goes
on to torchrun, which passes it to the ranks: rank 0 checkpoints and all stop, as in one process.

    torchrun --standalone --nproc-per-node N -m tasks.training.distributed_training WORK CHECKPOINT_DIR
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from model.config import DPAConfig
from model.cpu_malloc import GLIBC_TUNABLES
from model.distributed import process_group
from model.dpa import DPA, load_dpa, save_dpa
from model.progressive import Stage
from model.trainer import StepCallback, StepInfo, Trainer, seeded_dpa, select_device
from tasks.runtime.interrupt import checkpoint_on_stop, raise_if_stopping, stop_on_signal, stop_requested

CONFIG, IMAGES, INITIAL, CURVE, RESULT, LOGS = "config.json", "images.pt", "initial.pt", "curve.jsonl", "dpa.pt", "logs"
POLL_S = 0.2
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class RankFailed(RuntimeError):
    """A rank of the training job failed; the message holds its error and traceback."""


def train_distributed(cfg: DPAConfig, images: torch.Tensor, checkpoint_dir: Path, callbacks: Sequence[StepCallback]) -> DPA:
    """Train on `cfg.train.nproc_per_node` processes; the result equals a 1-process run up to float rounding."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ddp-", dir=checkpoint_dir) as tmp:  # on the project's disk, not /tmp
        work = Path(tmp)
        (work / CONFIG).write_text(cfg.model_dump_json())
        torch.save(images.cpu().clone(), work / IMAGES)  # a view would save its whole storage
        save_dpa(seeded_dpa(cfg), work / INITIAL)
        # its own session: a terminal's Ctrl-C reaches the ranks once, through the parent and torchrun
        proc = subprocess.Popen(torchrun_command(cfg.train.nproc_per_node, work, checkpoint_dir.resolve()),
                                env=_environment(cfg.train.nproc_per_node), stderr=subprocess.PIPE, start_new_session=True)
        try:
            output = _follow(proc, work / CURVE, callbacks)
        finally:
            if proc.poll() is None:  # the parent failed (e.g. logging): take the job down with it
                proc.terminate()
                proc.wait()
        if proc.returncode:
            raise_if_stopping()  # stopped by a signal: rank 0 has checkpointed, a rerun resumes
            raise RankFailed(failure_report(work / LOGS, proc.returncode, output))
        return load_dpa(work / RESULT).to(select_device(cfg.train.device))


def torchrun_command(nproc: int, work: Path, checkpoint_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--log-dir={work / LOGS}", "-m", __name__, str(work), str(checkpoint_dir)]


def _environment(nproc: int) -> dict[str, str]:
    """The ranks import this checkout's code; CPU threads are shared out (torchrun's default is 1 each)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)  # model.cpu_malloc; GPU ranks keep their big blocks on the device
    return env


def _follow(proc: subprocess.Popen, curve: Path, callbacks: Sequence[StepCallback]) -> str:
    """Until torchrun exits: replay rank 0's logged steps to the callbacks, echo torchrun's stderr
    and pass a stop signal on (once). Returns the end of the output, for an error report."""
    fd, decoder = proc.stderr.fileno(), codecs.getincrementaldecoder("utf-8")(errors="replace")
    os.set_blocking(fd, False)
    offset, tail, forwarded = 0, "", False
    while True:
        exited = proc.poll() is not None
        offset = _replay(curve, offset, callbacks)
        tail = (tail + _drain(fd, decoder))[-8000:]
        if exited:
            return tail
        if stop_requested() is not None and not forwarded:
            proc.send_signal(stop_requested())
            forwarded = True
        time.sleep(POLL_S)


def _drain(fd: int, decoder: codecs.IncrementalDecoder) -> str:
    """Echo and return what torchrun wrote since the last call (the pipe does not block)."""
    text = ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = b""
        if not chunk:
            sys.stderr.write(text)
            return text
        text += decoder.decode(chunk)


def _replay(curve: Path, offset: int, callbacks: Sequence[StepCallback]) -> int:
    """Pass the complete lines written since `offset` to the callbacks; return the new offset."""
    if not curve.exists():
        return offset
    with curve.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        step = json.loads(line)
        info = StepInfo(**{**step, "stage": Stage(**step["stage"])})
        for callback in callbacks:
            callback(info)
    return offset + len(complete)


def failure_report(logs: Path, returncode: int, output: str) -> str:
    """Each failed rank's error from torchrun's error files, the first failure first and with its
    traceback; without any (a rank killed by a signal, e.g. out of memory), torchrun's last output."""
    errors = []
    for path in logs.glob("*/attempt_*/*/error.json"):
        message = json.loads(path.read_text())["message"]
        errors.append((int(message["extraInfo"]["timestamp"]), int(path.parent.name), message))
    if not errors:
        return (f"torchrun exited with {returncode} and no rank left a Python error (killed by a signal, "
                f"e.g. out of memory?); its last output:\n{output}")
    (_, rank, first), *others = sorted(errors, key=lambda e: e[:2])
    also = "".join(f"\nrank {r} failed too: {m['message']}" for _, r, m in others)
    return f"rank {rank} failed: {first['message']}{also}\n\n{first['extraInfo']['py_callstack']}"


def _curve_writer(path: Path) -> StepCallback:
    def write(info: StepInfo) -> None:
        with path.open("a") as f:
            f.write(json.dumps(asdict(info)) + "\n")

    return write


@record
def main(work: Path, checkpoint_dir: Path) -> None:
    """One rank: train its share of every batch; rank 0 writes the curve, the checkpoints and the DPA."""
    cfg = DPAConfig.model_validate_json((work / CONFIG).read_text())
    images = torch.load(work / IMAGES, weights_only=True, mmap=True)
    with process_group(select_device(cfg.train.device)) as world, stop_on_signal():
        callbacks = [_curve_writer(work / CURVE)] if world.is_main else []
        trainer = Trainer(cfg, images, checkpoint_dir, callbacks, dpa=load_dpa(work / INITIAL))
        trainer.callbacks.append(checkpoint_on_stop(trainer))
        dpa = trainer.fit()
        if world.is_main:
            save_dpa(dpa, work / RESULT)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the results are on disk: skip the interpreter's teardown, seconds with torch and torchvision loaded
