"""`dpa benchmark` on two tiny phantom presets × 2 seeds, in process and on a Dask cluster of two
worker processes (one `distributed.LocalCluster` on 127.0.0.1 for the whole module), and a tuning
search on the same cluster.

The workers are spawned before the test project's settings exist, with a decoy tracking store in
their environment: runs only reach the project's store if the flows forward their settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import distributed
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.benchmark.cells import CELL_TAG, CellRecord
from tasks.config import CONFIG_DIR, apply_overrides
from tests.tiny import TINY_OVERRIDES
from tests.tuning.conftest import TINY_SEARCH

SEEDS = 2
PRESETS = {"tiny_r12": "r12", "tiny_r11": "r11"}
FIXTURE_FIGURE = {"test_auroc": 0.5, "source": "a test fixture's figure, not a published one"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[distributed.LocalCluster, Path]]:
    """Two worker processes whose own environment points MLflow at a decoy store."""
    decoy = tmp_path_factory.mktemp("decoy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy / 'mlflow.db'}")
        mp.setenv("DPA_PROJECT_DIR", str(decoy))
        local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    with local:
        yield local, decoy


@pytest.fixture(scope="module")
def bench_project(cluster, prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One project (data, caches, MLflow store) for the module: the cluster run reuses the data the
    in-process run imported."""
    root = tmp_path_factory.mktemp("benchmark") / "project"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", str(root)], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPA_PROJECT_DIR", str(root))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for name in [n for n in os.environ if n.startswith("DPA_DVC_")] + ["DPA_STUDY_STORAGE", "MLFLOW_EXPERIMENT_ID", "DPA_DASK_ADDRESS"]:
            mp.delenv(name, raising=False)
        yield root


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny phantom presets on the same data, differing in the VGG layer; one has a figure."""
    folder = tmp_path_factory.mktemp("presets")
    for name, layer in PRESETS.items():
        doc = apply_overrides(yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text()), {**TINY_OVERRIDES, "dpa.loss.layers": {16: {layer: 1.0}}})
        if layer == "r12":
            doc["paper"] = FIXTURE_FIGURE
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return folder


@dataclass(frozen=True)
class LocalRun:
    out: Path
    first: str
    rerun: str
    removed: CellRecord
    records: dict[str, CellRecord]


def records(out: Path) -> dict[str, CellRecord]:
    return {p.relative_to(out / "cells").as_posix(): CellRecord.model_validate_json(p.read_text()) for p in (out / "cells").rglob("*.json")}


def benchmark_cli(preset_dir: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["benchmark", "--preset", str(preset_dir / "*.yaml"), "--seeds", str(SEEDS), "--out", str(out), *extra])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def local_run(bench_project: Path, preset_dir: Path) -> LocalRun:
    """The benchmark in process (threads), then again after one cell's record is removed."""
    out = bench_project / "bench-local"
    first = benchmark_cli(preset_dir, out)
    before = records(out)
    removed_key = next(k for k in before if k.startswith("tiny_r12/seed1-"))
    (out / "cells" / removed_key).unlink()
    rerun = benchmark_cli(preset_dir, out)
    return LocalRun(out, first, rerun, before[removed_key], before)


def test_the_table_has_each_preset_with_its_seed_spread_baselines_and_figure(local_run: LocalRun) -> None:
    table = pd.read_csv(local_run.out / "benchmark.csv").set_index("preset")
    assert sorted(table.index) == sorted(PRESETS) and (table.seeds_done == SEEDS).all()
    done = records(local_run.out)
    for preset in PRESETS:
        aurocs = [r.test_auroc for r in done.values() if r.preset == preset]
        assert table.loc[preset, "test_auroc_mean"] == pytest.approx(sum(aurocs) / SEEDS)
        assert table.loc[preset, "test_auroc_std"] == pytest.approx(pd.Series(aurocs).std())
        assert table.loc[preset, "baseline_pca_auroc"] == pytest.approx(
            sum(r.baselines["pca"] for r in done.values() if r.preset == preset) / SEEDS)
        assert table.loc[preset, "train_images_per_s"] > 0 and table.loc[preset, "wall_seconds"] > 0
    assert table.loc["tiny_r12", "paper_test_auroc"] == FIXTURE_FIGURE["test_auroc"] and pd.isna(table.loc["tiny_r11", "paper_test_auroc"])
    text = (local_run.out / "benchmark.md").read_text()
    assert f"[1] {FIXTURE_FIGURE['source']}" in text and "0.500 [1]" in text and "mean_image" in text


def test_parent_run_holds_the_table_and_one_child_per_cell(local_run: LocalRun) -> None:
    client = MlflowClient()
    parent_id = json.loads((local_run.out / "parent_run.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"benchmark.csv", "benchmark.md"}
    assert parent.data.metrics["tiny_r11_test_auroc_mean"] == pytest.approx(
        pd.read_csv(local_run.out / "benchmark.csv").set_index("preset").loc["tiny_r11", "test_auroc_mean"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    finished = {c.info.run_id: c for c in children if c.info.status == "FINISHED"}
    assert len(finished) == len(PRESETS) * SEEDS + 1  # the rerun's cell got a new child run of the same parent
    for record in records(local_run.out).values():
        child = finished[record.run_id]
        assert child.data.metrics["test_auroc"] == pytest.approx(record.test_auroc)
        assert child.data.tags[CELL_TAG] == record.digest and child.data.params["dpa.train.seed"] == str(record.seed)


def test_a_rerun_runs_only_the_unfinished_cell_and_gets_the_same_figures(local_run: LocalRun) -> None:
    assert "4 cells run, 0 already done" in local_run.first and "1 cells run, 3 already done" in local_run.rerun
    after = records(local_run.out)
    assert after.keys() == local_run.records.keys()
    rerun_key = next(k for k in after if k.startswith("tiny_r12/seed1-"))
    assert after[rerun_key].run_id != local_run.removed.run_id
    assert after[rerun_key].test_auroc == local_run.removed.test_auroc  # same seed, same model: built alone or beside others
    assert all(after[k] == local_run.records[k] for k in after if k != rerun_key)  # the others untouched


@pytest.fixture(scope="module")
def dask_client(cluster) -> Iterator[distributed.Client]:
    """A client of the test's own (never the flows' default), with the scheduler's task stream on."""
    with distributed.Client(cluster[0], set_as_default=False) as client:
        client.get_task_stream(count=1)
        yield client


def tasks_ran(client: distributed.Client, since: float, name: str) -> list[dict]:
    """The tasks named `name` (by their function) that the cluster's workers ran since `since`."""
    return [t for t in client.get_task_stream(start=since) if t["key"].startswith(name)]


def test_benchmark_cells_run_and_resume_on_the_cluster_workers(cluster, dask_client, bench_project: Path, preset_dir: Path, local_run: LocalRun) -> None:
    local, decoy = cluster
    out, since = bench_project / "bench-cluster", time.time()
    output = benchmark_cli(preset_dir, out, "--cluster-address", local.scheduler_address)
    assert "4 cells run, 0 already done" in output
    cells = tasks_ran(dask_client, since, "run_cell")
    assert len(cells) == len(PRESETS) * SEEDS and {t["worker"] for t in cells} == set(local.scheduler_info["workers"])
    on_cluster = records(out)
    assert on_cluster.keys() == local_run.records.keys()
    for record in on_cluster.values():  # logged by the workers to the project's store, not to their own
        assert MlflowClient().get_run(record.run_id).data.metrics["test_auroc"] == pytest.approx(record.test_auroc)
    assert pd.read_csv(out / "benchmark.csv").seeds_done.tolist() == [SEEDS, SEEDS]

    removed = next(k for k in on_cluster if k.startswith("tiny_r11/seed0-"))
    (out / "cells" / removed).unlink()
    since = time.time()
    assert "1 cells run, 3 already done" in benchmark_cli(preset_dir, out, "--cluster-address", local.scheduler_address)
    assert len(tasks_ran(dask_client, since, "run_cell")) == 1
    assert records(out)[removed].test_auroc == on_cluster[removed].test_auroc  # same seed, same figure, on either worker
    assert not (decoy / "mlflow.db").exists()


def test_a_tuning_search_runs_its_trials_on_the_cluster(cluster, dask_client, bench_project: Path) -> None:
    from flows.tuning import TuningParams, tuning_pipeline

    local, decoy = cluster
    params = TuningParams(
        preset="demo", overrides=TINY_OVERRIDES, search_overrides={**TINY_SEARCH, "progressive": [False]}, folds=2,
        val_anomaly_type="nodule", n_anomalies=8, study_name="on-cluster", cluster_address=local.scheduler_address, max_workers=2,
    )
    since = time.time()
    summary = tuning_pipeline(params)
    assert summary["n_complete"] == 2
    trials = tasks_ran(dask_client, since, "run_trial")
    assert len(trials) == 2 and {t["worker"] for t in trials} == set(local.scheduler_info["workers"])
    parent = MlflowClient().get_run(summary["parent_run_id"])
    children = MlflowClient().search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["trial"] for c in children if c.info.status == "FINISHED") == ["0", "1"]
    assert not (decoy / "mlflow.db").exists()
