"""The acceptance story of the search, end to end on phantoms with a real Prefect server:

a search with two trials at a time is SIGKILLed once two trials are complete; restarted with the
same study name it finishes the grid without rerunning them; the loader never decoded a test image;
and the same command then trains, registers and gates the best config by mean CV AUROC.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

import data_layer.preprocessing
import flows.tuning
from data_layer.manifest import read_manifest
from flows.tuning import TuningParams, tuning_pipeline
from tasks.tuning import trial as trial_module
from tasks.tuning.space import point_key
from tests.tiny import TINY_OVERRIDES
from tests.tuning.conftest import TINY_SEARCH

REPO = Path(__file__).resolve().parents[2]
STUDY = "phantom-nodule"
GRID_POINTS = 4
FOLDS = 2

RUN_RECORDING_LOADER = """
import sys
import data_layer.preprocessing as loader
from flows.tuning import TuningParams, tuning_pipeline

log, read = open(sys.argv[2], "a", buffering=1), loader.read_image
def recording_read(path):
    log.write(f"{path}\\n")
    return read(path)
loader.read_image = recording_read
tuning_pipeline(TuningParams.model_validate_json(sys.argv[1]))
"""
"""The search as a separate process that every image decode goes through a recorder in."""


def params(**changes) -> TuningParams:
    return TuningParams(
        preset="demo", overrides=TINY_OVERRIDES, search_overrides=TINY_SEARCH, folds=FOLDS, val_anomaly_type="nodule",
        n_anomalies=50, study_name=STUDY, task_runner="threads", max_workers=2, model_name="dpa-tuning-test", **changes,
    )


@dataclass(frozen=True)
class Resumed:
    project: Path
    before_kill: list[FrozenTrial]
    study: optuna.Study
    summary: dict
    restart_trainings: list[str]
    reads: list[Path]


def load_study(project: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{project / 'optuna.db'}")


def count_states(db: Path) -> dict[str, int]:
    """Trials per state: a read-only peek at the study the other process is writing (Optuna's
    storage would create tables)."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return dict(conn.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # no database or no table yet
        return {}


def kill_when_two_trials_complete_and_one_runs(project: Path, read_log: Path, api_url: str) -> list[FrozenTrial]:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    proc = subprocess.Popen([sys.executable, "-c", RUN_RECORDING_LOADER, params().model_dump_json(), str(read_log)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the search exited before it was killed:\n{proc.stderr.read()[-3000:]}"
            states = count_states(project / "optuna.db")
            if states.get("COMPLETE", 0) >= 2 and states.get("RUNNING", 0) >= 1:  # mid-trial, not between trials
                proc.kill()
                proc.wait()
                return load_study(project).get_trials()
            time.sleep(0.05)
        raise AssertionError("no two trials completed with a third running within 240 s")
    finally:
        proc.kill()
        proc.stderr.close()


@pytest.fixture(scope="module")
def resumed(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resumed]:
    """Kill a search after two trials, then restart it with `train_best`: the one command that
    finishes the study and hands the winner to the training flow. Decodes are recorded until the
    hand-off starts (the training flow rightly reads the test split to evaluate)."""
    project = tmp_path_factory.mktemp("tuning") / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    read_log = project.parent / "reads.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPA_PROJECT_DIR", str(project))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        mp.delenv("DPA_STUDY_STORAGE", raising=False)
        before_kill = kill_when_two_trials_complete_and_one_runs(project, read_log, prefect_server)

        read, train, hand_off = data_layer.preprocessing.read_image, trial_module.train_fold, flows.tuning.training_pipeline
        searching, trainings = [True], []

        def recording_read(path):
            if searching[0]:
                with read_log.open("a") as log:
                    log.write(f"{path}\n")
            return read(path)

        def counting_train(cfg, *args, **kwargs):
            trainings.append(cfg.model_dump_json())
            return train(cfg, *args, **kwargs)

        def search_over_then_hand_off(*args, **kwargs):
            searching[0] = False
            return hand_off(*args, **kwargs)

        mp.setattr(data_layer.preprocessing, "read_image", recording_read)
        mp.setattr(trial_module, "train_fold", counting_train)
        mp.setattr(flows.tuning, "training_pipeline", search_over_then_hand_off)
        summary = tuning_pipeline(params(train_best=True))
        reads = [Path(line) for line in read_log.read_text().splitlines()]
        yield Resumed(project, before_kill, load_study(project), summary, trainings, reads)


def completed(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def test_killed_search_resumes_without_rerunning_finished_trials(resumed: Resumed) -> None:
    finished_before = completed(resumed.before_kill)
    assert 2 <= len(finished_before) < GRID_POINTS
    assert any(t.state == TrialState.RUNNING for t in resumed.before_kill)  # killed mid-trial

    after = resumed.study.get_trials()
    done = completed(after)
    assert len({point_key(t.params) for t in done}) == len(done) == GRID_POINTS  # the whole grid, each point once
    for old in finished_before:  # untouched: same trial, same result, same finish time
        assert (after[old.number].state, after[old.number].value, after[old.number].datetime_complete) == (
            TrialState.COMPLETE, old.value, old.datetime_complete)
    # the restart trained exactly the unfinished points, each on every fold
    assert len(resumed.restart_trainings) == (GRID_POINTS - len(finished_before)) * FOLDS
    stale = [t for t in resumed.before_kill if t.state == TrialState.RUNNING]
    assert all(after[t.number].state == TrialState.FAIL for t in stale)  # the dead run's trials, failed and rerun
    assert resumed.summary["n_complete"] == GRID_POINTS


def test_two_trials_ran_at_the_same_time(resumed: Resumed) -> None:
    spans = sorted((t.user_attrs["started_at"], t.user_attrs["finished_at"]) for t in completed(resumed.study.get_trials()))
    assert any(later_start < earlier_end for (_, earlier_end), (later_start, _) in zip(spans, spans[1:]))


def test_best_config_is_the_best_mean_cv_auroc(resumed: Resumed) -> None:
    done = completed(resumed.study.get_trials())
    means = {t.number: sum(t.user_attrs["fold_aurocs"]) / FOLDS for t in done}
    best = resumed.summary["best"]
    assert best["mean_cv_auroc"] == pytest.approx(max(means.values()))
    assert means[best["trial"]] == max(means.values())
    assert len(best["fold_aurocs"]) == FOLDS
    winner = resumed.study.trials[best["trial"]]
    iterations = round(sum(winner.user_attrs["best_iterations"]) / FOLDS)
    last_stage_key = "dpa.train.iters_per_res" if winner.params["progressive"] else "dpa.train.stab_iters"
    assert str(iterations) in json.dumps(best["overrides"][last_stage_key])


def test_parent_run_holds_leaderboard_plot_best_config_and_one_child_per_training(resumed: Resumed) -> None:
    client = MlflowClient(f"sqlite:///{resumed.project / 'mlflow.db'}")
    parent = client.get_run(resumed.summary["parent_run_id"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "auroc_vs_hyperparameters.png", "best_config.yaml"} <= artifacts
    board = pd.read_csv(client.download_artifacts(parent.info.run_id, "leaderboard.csv"))
    assert len(board) == GRID_POINTS and board.mean_cv_auroc.is_monotonic_decreasing
    saved = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "best_config.yaml")).read_text())
    assert saved["trial"] == resumed.summary["best"]["trial"]

    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finished = [c for c in children if c.info.status == "FINISHED"]
    per_point = Counter(point_key({k: c.data.params[k] for k in ("capacity", "vgg_layers", "progressive")}) for c in finished)
    assert len(per_point) == GRID_POINTS and set(per_point.values()) == {1}
    assert all({f"fold{k}_auroc" for k in range(FOLDS)} <= set(c.data.metrics) for c in finished)
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}  # the killed run's trials do not stay RUNNING


def test_search_never_decodes_a_test_image(resumed: Resumed) -> None:
    manifest = read_manifest(resumed.project / "datasets" / "demo")  # the workspace the search imported into
    view = next((resumed.project / ".dpa" / "tuning").iterdir())
    assert resumed.reads, "the recorder saw no decode at all"
    assert all(path.is_relative_to(view) for path in resumed.reads)  # only the train/val view is ever opened
    read = {path.relative_to(view).as_posix() for path in resumed.reads}
    assert read == set(manifest.path[manifest.split != "test"])
    assert read.isdisjoint(manifest.path[manifest.split == "test"])


def test_the_same_command_trains_registers_and_gates_the_best_config(resumed: Resumed) -> None:
    training = resumed.summary["training"]
    assert training["data_version"] == resumed.summary["data_version"]  # trained on the data the folds came from
    client = MlflowClient(f"sqlite:///{resumed.project / 'mlflow.db'}")
    version = client.get_model_version(training["model_name"], training["version"])
    assert version.run_id == training["run_id"]
    assert "challenger" in version.aliases and training["decision"]
    assert "test_auroc" in client.get_run(training["run_id"]).data.metrics
    resolved = json.loads(Path(client.download_artifacts(training["run_id"], "config/resolved_config.json")).read_text())
    best = resumed.summary["best"]
    rung = next(r for r in TINY_SEARCH["ladder"] if best["point"]["capacity"].startswith(f"d{r['latent_dim']}-"))
    assert (resolved["dpa"]["network"]["latent_dim"], resolved["dpa"]["train"]["lr"]) == (rung["latent_dim"], rung["lr"])
    assert (resolved["dpa"]["train"]["initial_res"] is not None) == best["point"]["progressive"]

