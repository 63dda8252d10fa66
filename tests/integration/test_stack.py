"""`dpa up` / `dpa down` with real processes: the stack comes up on PostgreSQL with its deployments and
a worker, a second `dpa up` is refused while it runs, and `dpa down` leaves no process behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.stack import Stack, read_stack, running_processes
from tests.integration.conftest import BIN, REPO, dpa_stack, postgres_database, postgres_url, run_command

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    with postgres_database("dpa_stack") as database:
        with dpa_stack(tmp_path_factory.mktemp("stack"), prefect_db=postgres_url(database, "postgresql+asyncpg")) as up:
            yield up


def test_up_serves_both_uis_deployments_and_a_worker(stack: tuple[Stack, dict[str, str]]) -> None:
    running, _ = stack
    assert {p.name for p in running_processes(running)} == {"prefect-server", "mlflow-server", "worker"}
    assert running.database.startswith("postgresql+asyncpg://")
    assert httpx.get(f"{running.mlflow_url}/health", timeout=10).is_success
    deployments = httpx.post(f"{running.api_url}/deployments/filter", json={}, timeout=30).json()
    assert {d["name"] for d in deployments} == {"scheduled-retraining", "train-on-demand", "batch-scoring", "tune"}
    queues = httpx.post(f"{running.api_url}/work_pools/dpa-pool/queues/filter", json={}, timeout=30).json()
    assert {q["name"]: q["concurrency_limit"] for q in queues if q["name"] != "default"} == {"training": 1, "scoring": None}
    automations = httpx.post(f"{running.api_url}/automations/filter", json={}, timeout=30).json()
    assert [a["name"] for a in automations] == ["dpa-crash-unresponsive-runs"]  # crashed-run detection
    workers = httpx.post(f"{running.api_url}/work_pools/dpa-pool/workers/filter", json={}, timeout=30).json()
    assert workers, "no worker polls dpa-pool"
    ui = httpx.get(running.prefect_url, timeout=30)
    assert ui.is_success and "<html" in ui.text.lower()
    for process in running.processes:
        assert Path(process.log).is_file()


def test_second_up_is_refused(stack: tuple[Stack, dict[str, str]]) -> None:
    running, env = stack
    again = subprocess.run([str(BIN / "dpa"), "up"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert "already running" in again.stderr and running.prefect_url in again.stderr, again.stderr
    assert len(running_processes(running)) == 3


def test_down_leaves_no_process_behind(stack: tuple[Stack, dict[str, str]]) -> None:
    running, env = stack
    tree = [psutil.Process(p.pid) for p in running.processes]
    tree += [child for parent in tree for child in parent.children(recursive=True)]
    output = run_command([str(BIN / "dpa"), "down"], env, timeout=300)
    assert "stopped prefect-server" in output
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert read_stack(Path(env["DPA_PROJECT_DIR"])) is None
    assert "no stack was running" in run_command([str(BIN / "dpa"), "down"], env, timeout=300)
