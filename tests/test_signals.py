"""SIGTERM/SIGINT to real `dpa train` and `dpa tune` processes (as `timeout`, systemd, Kubernetes or
a Prefect cancellation send them): the work stops within 30 s with exit 143/130, training leaves a
checkpoint its rerun resumes from, a search marks its running trials so the rerun re-queues them.
`dpa score` is covered in tests/pipeline/test_scoring_resume.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.tiny import TINY_OVERRIDES
from tests.tuning.conftest import TINY_SEARCH

REPO = Path(__file__).resolve().parents[1]
DPA = str(Path(sys.executable).parent / "dpa")
STOP_WITHIN_S = 30


def sets(flag: str, values: dict) -> list[str]:
    """Overrides as a user types them: `--set key=<YAML>`."""
    return [arg for key, value in values.items() for arg in (flag, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")]


class Running:
    """A `dpa` command whose merged output is read line by line while it runs."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen([DPA, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        """Lines end at \n or \r (progress bars redraw with \r)."""
        line = ""
        while char := self.process.stdout.read(1):
            line += char
            if char in "\r\n":
                self.lines.append(line)
                line = ""
        self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            assert self.process.poll() is None, f"exited {self.process.returncode} before {pattern!r}:\n{self.output[-4000:]}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output[-4000:]}")

    def stop(self, sig: signal.Signals) -> float:
        """Send `sig`; the seconds until the process exited."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=120)
        self.reader.join(10)
        return time.monotonic() - sent

    def finish(self, timeout: float = 400) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None
        self.reader.join(10)
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def env(project: Path, prefect_server: str) -> Iterator[dict[str, str]]:
    yield {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_server, "PYTHONUNBUFFERED": "1"}


TRAIN = ["train", "--preset", "demo", "--model-name", "dpa-signal-test",
         *sets("--set", {**TINY_OVERRIDES, "dpa.train.stab_iters": 150, "dpa.train.log_every": 5})]


def test_sigterm_to_dpa_train_checkpoints_exits_143_and_the_rerun_resumes(project: Path, env: dict[str, str]) -> None:
    run = Running(TRAIN, env)
    run.wait_for(r"DPA:\s+\d+%.*\b([1-9]\d*)/150")  # training is under way
    seconds = run.stop(signal.SIGTERM)
    assert seconds < STOP_WITHIN_S and run.process.returncode == 128 + signal.SIGTERM, run.output[-4000:]
    stopped_at = int(re.search(r"checkpoint written at iteration (\d+)/150", run.output).group(1))
    assert 0 < stopped_at < 150 and "stopped by SIGTERM" in run.output
    assert len(list((project / ".dpa" / "checkpoints").rglob("checkpoint.pt"))) == 1
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.search_model_versions("name = 'dpa-signal-test'") == []  # nothing registered by the stopped run

    rerun = Running(TRAIN, env)
    assert rerun.finish() == 0, rerun.output[-4000:]
    versions = client.search_model_versions("name = 'dpa-signal-test'")
    assert len(versions) == 1
    steps = [m.step for m in client.get_metric_history(versions[0].run_id, "train_loss")]
    assert steps and min(steps) > stopped_at and max(steps) == 150  # resumed from the checkpoint, not from 0


TUNE = ["tune", "--preset", "demo", "--val-anomaly-type", "nodule", "--folds", "2", "--study", "signals", "--workers", "2",
        *sets("--set", {**TINY_OVERRIDES, "dpa.train.log_every": 2}),
        *sets("--search-set", {**TINY_SEARCH, "max_iters": 60, "val_every": 20, "patience": 5})]


def wait_for_a_fresh_trial(storage: Path, run: Running, timeout: float = 120) -> None:
    """Signal only once a trial asked after the first finished is running: a trial about to end when
    the signal comes is kept (as it should be), so an older one alone may leave nothing to mark."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.process.poll() is None, f"exited {run.process.returncode} before a third trial started:\n{run.output[-4000:]}"
        running = optuna.load_study(study_name="signals", storage=f"sqlite:///{storage}").get_trials(states=(TrialState.RUNNING,))
        if any(t.number >= 2 for t in running):  # trials 0 and 1 start together (2 workers)
            return
        time.sleep(0.2)
    raise AssertionError(f"no third trial running within {timeout} s:\n{run.output[-4000:]}")


def test_sigterm_to_dpa_tune_marks_running_trials_and_the_rerun_requeues_them(project: Path, env: dict[str, str]) -> None:
    run = Running(TUNE, env)
    plan = run.wait_for(r"plan: 4 trials × 2 folds × at most (\d+) iterations = (\d+) iterations; warm-up ([\d.]+) s/iteration")
    assert int(plan.group(2)) <= 4 * 2 * int(plan.group(1)) and float(plan.group(3)) > 0
    run.wait_for(r"trial \d+ mean CV AUROC [\d.]+ — 1/4 done, best so far [\d.]+ \(trial \d+\); elapsed \S+, about \S+ left")
    wait_for_a_fresh_trial(project / "optuna.db", run)
    seconds = run.stop(signal.SIGTERM)
    assert seconds < STOP_WITHIN_S and run.process.returncode == 128 + signal.SIGTERM, run.output[-4000:]
    study = optuna.load_study(study_name="signals", storage=f"sqlite:///{project / 'optuna.db'}")
    trials = study.get_trials()
    interrupted = [t for t in trials if t.user_attrs.get("interrupted") == "SIGTERM"]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    done_before = {t.number for t in trials if t.state == TrialState.COMPLETE}

    rerun = Running(TUNE, env)
    assert rerun.finish() == 0, rerun.output[-4000:]
    assert f"rerunning the unfinished trials {sorted(t.number for t in interrupted)}" in rerun.output
    after = optuna.load_study(study_name="signals", storage=f"sqlite:///{project / 'optuna.db'}").get_trials()
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len({str(sorted(t.params.items())) for t in complete}) == len(complete) == 4
    assert done_before <= {t.number for t in complete}  # finished trials were kept, not rerun
