"""Stopping long work on SIGTERM/SIGINT at a safe point (systemd, Kubernetes, `timeout`, Ctrl-C,
a Prefect cancellation all send one of them).

Prefect's own SIGTERM bridge raises wherever the main thread happens to be (mid optimiser step);
inside `stop_on_signal()` a signal only *asks* to stop: long loops call `raise_if_stopping()` at
points where their state is consistent (after a training step, between scoring chunks, between
trials), save what must survive (checkpoint, flushed scores, trial states), then stop. The
exception raised is the one Prefect already treats as a crash (`TerminationSignal` for SIGTERM,
`KeyboardInterrupt` for SIGINT), so runs are marked crashed, not failed. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from prefect.exceptions import TerminationSignal

from model.trainer import StepInfo, Trainer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []
"""Signals received inside `stop_on_signal` (process-wide: trial threads read it too)."""
_depth = 0
_lock = threading.Lock()


def stop_requested() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _requested[0] if _requested else None


def interruption(signum: int) -> BaseException:
    """The exception a stop on `signum` raises (what Prefect and Python expect for that signal)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else TerminationSignal(signal=signum)


def raise_if_stopping() -> None:
    """Raise the stop exception when a signal arrived; call where stopping leaves nothing half-done."""
    signum = stop_requested()
    if signum is not None:
        raise interruption(signum)


def stop_now(signum: int, frame: FrameType | None) -> None:
    """A handler that stops at once (outside the safe-point blocks, nothing needs saving)."""
    raise interruption(signum)


def _ask_to_stop(signum: int, frame: FrameType | None) -> None:
    if _requested:  # a second signal: stop now, wherever we are
        raise interruption(signum)
    _requested.append(signum)
    print(f"received {signal.Signals(signum).name}: stopping at the next safe point (send it again to stop at once)", flush=True)


@contextmanager
def stop_on_signal() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT request a stop instead of interrupting. Nested blocks reuse
    the outer handlers; outside the main thread (where signals cannot be handled) this is a no-op.
    A request outlives the block: worker threads still running must see it, the process is stopping."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _lock:
        _depth += 1
        previous = {sig: signal.signal(sig, _ask_to_stop) for sig in STOP_SIGNALS} if _depth == 1 else {}
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def checkpoint_on_stop(trainer: Trainer) -> Callable[[StepInfo], None]:
    """A trainer callback: when a stop was requested, write the trainer's checkpoint (if it has a
    checkpoint dir), then stop. Runs after a completed step, so the checkpoint resumes exactly."""

    def callback(info: StepInfo) -> None:
        if stop_requested() is not None:
            if trainer.checkpoint_dir is not None and trainer.world.is_main:  # rank 0 writes for all
                trainer.save_checkpoint()
                print(f"checkpoint written at iteration {info.iteration}/{info.total_iterations}: {trainer.checkpoint_path}", flush=True)
            raise_if_stopping()

    return callback
