"""`dpa up` / `dpa down` with real processes: the stack comes up on PostgreSQL with its deployments and
a worker, a second `dpa up` is refused while it runs, and `dpa down` leaves no process behind; a busy
port or a tracking-server URI is refused before anything starts; the local PostgreSQL is found."""

from __future__ import annotations

import socket
import subprocess
import uuid
from pathlib import Path

import httpx
import psutil
import psycopg2
import pytest

from tasks.runtime.servers import HOST, free_port
from tasks.runtime.stack import LOCAL_POSTGRES, Stack, StackError, prefect_database_url, read_stack, running_processes, up
from tests.integration.conftest import BIN, REPO, drop_database, run_command

pytestmark = pytest.mark.integration


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
    assert sorted(a["name"] for a in automations) == ["dpa-crash-unresponsive-runs", "retrain-on-score-drift"]  # crashed runs; drift
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


@pytest.mark.ends_shared_stack
def test_down_leaves_no_process_behind(stack: tuple[Stack, dict[str, str]]) -> None:
    running, env = stack
    tree = [psutil.Process(p.pid) for p in running.processes]
    tree += [child for parent in tree for child in parent.children(recursive=True)]
    output = run_command([str(BIN / "dpa"), "down"], env, timeout=300)
    assert "stopped prefect-server" in output
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert read_stack(Path(env["DPA_PROJECT_DIR"])) is None
    assert "no stack was running" in run_command([str(BIN / "dpa"), "down"], env, timeout=300)


def test_a_busy_port_is_refused_before_anything_starts(project: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StackError, match=rf"{HOST}:{port} is in use.*--prefect-port"):
            up(prefect_port=port, mlflow_port=free_port())
    assert read_stack(project) is None and not (project / ".dpa" / "stack" / "prefect-server.log").exists()


def test_a_tracking_server_uri_is_refused_before_anything_starts(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with pytest.raises(StackError, match="already a tracking server; unset it"):
        up(prefect_port=free_port(), mlflow_port=free_port())
    assert read_stack(project) is None and not (project / ".dpa" / "stack" / "prefect-server.log").exists()


def test_the_local_postgresql_is_found_and_its_database_created() -> None:
    name = f"dpa_prefect_probe_{uuid.uuid4().hex[:8]}"
    try:
        assert prefect_database_url(None, name) == f"postgresql+asyncpg://postgres@{HOST}:5432/{name}"
        assert prefect_database_url(None, name) == f"postgresql+asyncpg://postgres@{HOST}:5432/{name}"  # exists now: reused
        with psycopg2.connect(dbname=name, **LOCAL_POSTGRES):
            pass
    finally:
        drop_database(name)
    assert prefect_database_url("sqlite", name) is None
    assert prefect_database_url("postgresql+asyncpg://db.example/prefect", name) == "postgresql+asyncpg://db.example/prefect"


def test_without_a_local_postgresql_the_server_uses_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LOCAL_POSTGRES, "port", free_port())  # nothing listens there
    assert prefect_database_url(None) is None
