"""The search space, the study (resume rules, storage) and early stopping, without a Prefect server."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from model.progressive import stage_schedule
from tasks.config import PipelineParams, resolve_run_config
from tasks.tuning import trial as trial_module
from tasks.tuning.space import EarlyStopping, load_search_space, point_key, trial_configs
from tasks.tuning.study import open_study, point_of, requeue_unfinished, study_storage_url
from tasks.tuning.trial import train_fold
from tests.tiny import TINY_OVERRIDES
from tests.tuning.conftest import TINY_SEARCH


@pytest.mark.parametrize("preset", ["demo", "nih_pa_wo_pg"])
def test_every_point_of_the_shipped_ladder_is_a_valid_config(preset: str) -> None:
    space = load_search_space("ladder")
    params = PipelineParams(preset=preset)
    configs = trial_configs(params, space, resolve_run_config(params))
    assert len(configs) == 5 * 3 * 2 == len(space.grid())
    for point in space.grid():
        dpa = configs[point_key(point)]
        rung = next(r for r in space.ladder if r.label == point["capacity"])
        assert (dpa.network.latent_dim, dpa.train.lr) == (rung.latent_dim, rung.lr)
        assert set(dpa.network.enc_channels.values()) == {rung.width}
        assert set(dpa.loss.layers_at(dpa.network.max_res)) == set(point["vgg_layers"].split("+"))
        assert (dpa.train.initial_res is not None) == point["progressive"]


def test_a_point_the_model_rejects_fails_before_any_training() -> None:
    params = PipelineParams(preset="camelyon16_wo_pg")  # an 8×8×d latent needs d == the innermost width
    with pytest.raises(ValueError, match=r"(?s)search point \{'capacity': 'd256-w64-lr0.0002'.*latent channels \(256\)"):
        trial_configs(params, load_search_space("ladder"), resolve_run_config(params))


def test_tuned_iterations_replace_the_budget_of_the_last_stage() -> None:
    space = load_search_space("ladder", TINY_SEARCH)
    params = PipelineParams(preset="demo", overrides=TINY_OVERRIDES)
    cfg = resolve_run_config(params)
    for progressive, key in ((False, "dpa.train.stab_iters"), (True, "dpa.train.iters_per_res")):
        point = {"capacity": "d4-w4-lr0.01", "vgg_layers": "r12", "progressive": progressive}
        tuned = resolve_run_config(params.model_copy(update={"overrides": {**TINY_OVERRIDES, **space.overrides(point, cfg, 7)}}))
        stages = stage_schedule(tuned.dpa)
        assert stages[-1].res == 16 and stages[-1].iters == 7, key


def test_unknown_search_space_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: ladder"):
        load_search_space("nope")


def test_study_storage_sits_beside_mlflow_not_inside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DPA_STUDY_STORAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert study_storage_url() == f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:p@db/mlflow")
    with pytest.raises(ValueError, match="DPA_STUDY_STORAGE"):
        study_storage_url()
    monkeypatch.setenv("DPA_STUDY_STORAGE", "postgresql://u:p@db/optuna")
    assert study_storage_url() == "postgresql://u:p@db/optuna"
    assert study_storage_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    space = load_search_space("ladder", TINY_SEARCH)
    return open_study("s", f"sqlite:///{tmp_path / 'optuna.db'}", space, "grid", {"p": 1})


def test_parallel_asks_never_draw_the_same_grid_point(study: optuna.Study) -> None:
    distributions = load_search_space("ladder", TINY_SEARCH).distributions()
    trials = [study.ask(distributions) for _ in range(4)]  # all running at once
    assert len({point_key(t.params) for t in trials}) == 4
    for trial in trials:
        study.tell(trial, 0.5)  # the last grid point must not make `tell` raise (optuna#4121)


def test_restart_reruns_unfinished_points_and_never_finished_ones(study: optuna.Study, tmp_path: Path) -> None:
    distributions = load_search_space("ladder", TINY_SEARCH).distributions()
    done, crashed, killed = (study.ask(distributions) for _ in range(3))
    study.tell(done, 0.7)
    study.tell(crashed, state=TrialState.FAIL)
    # `killed` stays RUNNING, as a dead process leaves it; the restart loads the study afresh
    space = load_search_space("ladder", TINY_SEARCH)
    resumed = open_study("s", f"sqlite:///{tmp_path / 'optuna.db'}", space, "grid", {"p": 1})
    assert sorted(requeue_unfinished(resumed)) == [crashed.number, killed.number]
    assert resumed.trials[killed.number].state == TrialState.FAIL
    waiting = resumed.get_trials(states=(TrialState.WAITING,))
    assert sorted(point_key(point_of(t)) for t in waiting) == sorted(point_key(t.params) for t in (crashed, killed))
    assert requeue_unfinished(resumed) == []  # already queued: not twice
    queued = [resumed.ask(distributions) for _ in range(2)]
    fresh = resumed.ask(distributions)  # the one point never tried
    seen = {point_key(t.params) for t in (done, crashed, killed)}
    assert {point_key(t.params) for t in queued} == seen - {point_key(done.params)}
    assert point_key(fresh.params) not in seen
    assert resumed.trials[done.number].state == TrialState.COMPLETE


def test_a_trial_killed_while_its_parameters_were_set_is_rerun_whole(study: optuna.Study, tmp_path: Path) -> None:
    """`ask` stores a trial's parameters one by one: a kill in between leaves some unset. The rerun
    enqueues the trial's whole grid point (an enqueued partial point would stop every later ask)."""
    distributions = load_search_space("ladder", TINY_SEARCH).distributions()
    first, *rest = sorted(distributions)
    partial = study.ask({first: distributions[first]})  # killed before the other parameters were set
    assert set(partial.params) == {first} and rest
    resumed = open_study("s", f"sqlite:///{tmp_path / 'optuna.db'}", load_search_space("ladder", TINY_SEARCH), "grid", {"p": 1})
    assert requeue_unfinished(resumed) == [partial.number]
    rerun = resumed.ask(distributions)  # raised "All parameters must be specified ..." before
    assert set(rerun.params) == set(distributions) and rerun.params[first] == partial.params[first]


def test_a_study_resumes_only_under_the_same_protocol(study: optuna.Study, tmp_path: Path) -> None:
    space = load_search_space("ladder", TINY_SEARCH)
    with pytest.raises(ValueError, match="other p;"):
        open_study("s", f"sqlite:///{tmp_path / 'optuna.db'}", space, "grid", {"p": 2})


def test_early_stopping_keeps_the_best_point_and_waits_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    params = PipelineParams(preset="demo", overrides={**TINY_OVERRIDES, "dpa.train.stab_iters": 60})
    cfg = resolve_run_config(params).dpa
    scripted = iter([0.6, 0.8, 0.805, 0.7, 0.9, 0.95])
    monkeypatch.setattr(trial_module, "validation_auroc", lambda *args: next(scripted))
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    seen = []
    outcome = train_fold(cfg, images, images[:4], images[4:8], EarlyStopping(val_every=10, patience=2, min_delta=0.01),
                         lambda step, auroc: seen.append(step))
    # 0.805 is not 0.01 better than 0.8: with 0.7 that is two evaluations without improvement
    assert (outcome.best_auroc, outcome.best_iteration) == (0.8, 20)
    assert seen == [10, 20, 30, 40]
    assert [step for step, _ in outcome.curve] == seen
