"""Running a study's trials: keep `max_workers` of them in flight through a task runner, record
each result or failure in the study, and on SIGTERM/SIGINT stop them at a safe point, marked for the
next run of the study to re-queue. Used by flows/tuning.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from prefect.futures import PrefectFuture, wait

from tasks.runtime.interrupt import raise_if_stopping, stop_on_signal, stop_requested
from tasks.tuning.plan import Progress
from tasks.tuning.study import record_failure, record_result


def run_trials(study: optuna.Study, distributions: dict[str, Any], launch: Callable[[optuna.Trial], PrefectFuture],
               max_workers: int, target: int) -> None:
    """Keep `max_workers` trials running until the study has `target` complete trials (a trial
    that fails here is recorded and left for the next restart, not retried in a loop). A line per
    finished trial says how far the search is. On SIGTERM/SIGINT the running trials stop at their
    next step and are marked failed ("interrupted"), so the next run of the study re-queues them."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    budget, progress = target - complete, Progress(total=target, already_done=complete)
    running: dict[PrefectFuture, optuna.Trial] = {}
    with stop_on_signal():
        while budget > 0 or running:
            while budget > 0 and len(running) < max_workers and stop_requested() is None:
                trial = study.ask(distributions)
                running[launch(trial)] = trial
                budget -= 1
            done = wait(list(running), timeout=1.0).done
            if stop_requested() is not None:  # before reading results: a stopped trial's result is its interruption
                _stop_trials(running)
            for future in done:
                _settle(running.pop(future), future, progress)


def _settle(trial: optuna.Trial, future: PrefectFuture, progress: Progress) -> None:
    try:
        record_result(trial, future.result())
        value = trial.study.trials[trial.number].value
    except Exception as exc:  # a diverged or crashed trial must not stop the others
        record_failure(trial, exc)
        print(f"trial {trial.number} {trial.params} failed: {exc}")
        value = None
    best = trial.study.best_trial if any(t.state == TrialState.COMPLETE for t in trial.study.get_trials(deepcopy=False)) else None
    print(progress.line(trial.number, value, (best.number, best.value) if best else None))


def _stop_trials(running: dict[PrefectFuture, optuna.Trial], grace_seconds: float = 25.0) -> None:
    """Let the running trials reach their stop point (a trial that finishes meanwhile is kept),
    mark the others as interrupted failures, which the next run of the study re-queues, then stop."""
    name = signal.Signals(stop_requested()).name
    wait(list(running), timeout=grace_seconds)
    interrupted = []
    for future, trial in running.items():
        if future.state.is_completed():
            record_result(trial, future.result())
            continue
        trial.set_user_attr("interrupted", name)
        record_failure(trial, RuntimeError(f"interrupted by {name}; rerun the study to resume"))
        interrupted.append(trial.number)
    print(f"stopped by {name}: trial(s) {interrupted} marked for a rerun; start the search again with the same study name to resume")
    raise_if_stopping()
