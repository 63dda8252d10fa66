"""`dpa up` / `dpa down`: the local production-like stack a person triggers runs from (docs/deployments.md).

On 127.0.0.1 only: a Prefect server (PostgreSQL when given or reachable, else SQLite), an MLflow
tracking server on the project's store, the work pool and its queues, the automations of
`automations/` (crashed-run detection), the deployments of `prefect.yaml`, and a process worker. What was started is recorded in `.dpa/stack/stack.json`
(pid and start time of each process, so a reused pid is never signalled); `dpa down` stops exactly
those processes and their descendants (flow runs start in sessions of their own). Logs go to
`.dpa/stack/*.log`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg2
import yaml
from psycopg2 import sql

from tasks.paths import PROJECT_ROOT, project_dir
from tasks.runtime.servers import HOST, start_server

BIN = Path(sys.executable).parent
POOL = "dpa-pool"
QUEUES = {"training": 1, "scoring": None}  # name → concurrency limit (docs/deployments.md)
LOCAL_POSTGRES = {"host": HOST, "port": 5432, "user": "postgres"}
LOCAL_DATABASE = "dpa_prefect"


class StackError(RuntimeError):
    """The stack cannot be brought up or down; the message says why and what to do."""


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    started: float  # psutil create_time: with the pid, identifies the process
    log: str


@dataclass
class Stack:
    prefect_url: str
    mlflow_url: str
    prefect_home: str
    database: str
    processes: list[Process] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def client_env(self) -> dict[str, str]:
        """What a Prefect client (CLI, worker, flow run) needs to reach this stack."""
        return {
            "PREFECT_API_URL": self.api_url, "PREFECT_HOME": self.prefect_home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false",
        }


def stack_dir(project: Path | None = None) -> Path:
    return (project or project_dir()) / ".dpa" / "stack"


def state_file(project: Path | None = None) -> Path:
    return stack_dir(project) / "stack.json"


def read_stack(project: Path | None = None) -> Stack | None:
    path = state_file(project)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return Stack(**{**doc, "processes": [Process(**p) for p in doc["processes"]]})


def _write_stack(stack: Stack, project: Path) -> None:
    state_file(project).write_text(json.dumps(asdict(stack), indent=2))


def _alive(process: Process) -> psutil.Process | None:
    """The live process recorded as `process`, or None (gone, or its pid now belongs to another)."""
    try:
        live = psutil.Process(process.pid)
        if abs(live.create_time() - process.started) < 1e-3 and live.status() != psutil.STATUS_ZOMBIE:
            return live
    except psutil.NoSuchProcess:
        pass
    return None


def running_processes(stack: Stack) -> list[Process]:
    return [p for p in stack.processes if _alive(p) is not None]


def prefect_database_url(explicit: str | None, database: str = LOCAL_DATABASE) -> str | None:
    """The Prefect server's database: `explicit` (a URL, or 'sqlite'), else a database on the local
    PostgreSQL when one answers (created if missing), else None (SQLite under PREFECT_HOME)."""
    if explicit:
        return None if explicit == "sqlite" else explicit
    try:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=2, **LOCAL_POSTGRES)
    except psycopg2.OperationalError:
        return None
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        connection.close()
    return f"postgresql+asyncpg://{LOCAL_POSTGRES['user']}@{HOST}:{LOCAL_POSTGRES['port']}/{database}"


def mlflow_backend_uri() -> str:
    """The project's MLflow store, which the tracking server serves (never another server)."""
    from tasks.registry.tracking import tracking_uri  # (imports MLflow: only `dpa up` pays for it)

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise StackError(f"MLFLOW_TRACKING_URI={uri} is already a tracking server; unset it (or point it at a database) for `dpa up`")
    return uri


def up(prefect_port: int = 4200, mlflow_port: int = 5000, prefect_db: str | None = None, timeout: float = 180) -> Stack:
    """Start the stack; refuse if one recorded for this project is still running."""
    project = project_dir()
    previous = read_stack(project)
    if previous is not None and running_processes(previous):
        raise StackError(
            f"the stack is already running (Prefect UI {previous.prefect_url}, MLflow UI {previous.mlflow_url}, "
            f"pids {', '.join(str(p.pid) for p in running_processes(previous))}); stop it with `dpa down`"
        )
    for port in (prefect_port, mlflow_port):
        _require_free(port)
    mlflow_backend_uri()  # refused before anything starts
    logs = stack_dir(project)
    logs.mkdir(parents=True, exist_ok=True)
    database = prefect_database_url(prefect_db or os.environ.get("DPA_PREFECT_DB_URL"))
    stack = Stack(
        prefect_url=f"http://{HOST}:{prefect_port}", mlflow_url=f"http://{HOST}:{mlflow_port}",
        prefect_home=str(logs / "prefect-home"), database=database or "sqlite",
    )
    try:
        for name, start in (("prefect-server", _start_prefect), ("mlflow-server", _start_mlflow), ("worker", _start_worker)):
            stack.processes.append(start(stack, logs, database, timeout))
            _write_stack(stack, project)  # recorded as soon as started: `dpa down` finds a half-started stack
            if name == "prefect-server":
                _create_pool_and_queues(stack)
                _create_automations(stack)
                _deploy(stack, logs, timeout)
        _wait_for_worker(stack, timeout)
    except BaseException:
        down(project)
        raise
    return stack


def _require_free(port: int) -> None:
    """Checked first: a health check would otherwise pass against whatever already listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError as error:
            raise StackError(f"{HOST}:{port} is in use ({error.strerror}); choose another port (--prefect-port / --mlflow-port)") from None


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    return {**os.environ, **stack.client_env(), **extra}


def _record(name: str, process: subprocess.Popen, log: Path) -> Process:
    return Process(name, process.pid, psutil.Process(process.pid).create_time(), str(log))


def _start_prefect(stack: Stack, logs: Path, database: str | None, timeout: float) -> Process:
    env = {"PREFECT_HOME": stack.prefect_home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": stack.api_url}
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    port = int(stack.prefect_url.rsplit(":", 1)[1])
    command = [str(BIN / "prefect"), "server", "start", "--host", "{host}", "--port", "{port}"]
    log = logs / "prefect-server.log"
    server = start_server(command, "/api/health", env=env, log_file=log, port=port, timeout=timeout)
    return _record("prefect-server", server.process, log)


def _start_mlflow(stack: Stack, logs: Path, database: str | None, timeout: float) -> Process:
    port = int(stack.mlflow_url.rsplit(":", 1)[1])
    command = [
        str(BIN / "mlflow"), "server", "--host", "{host}", "--port", "{port}", "--workers", "1",
        "--backend-store-uri", mlflow_backend_uri(), "--artifacts-destination", str(project_dir() / "mlartifacts"),
    ]
    log = logs / "mlflow-server.log"
    server = start_server(command, "/health", log_file=log, port=port, timeout=timeout, cwd=project_dir())
    return _record("mlflow-server", server.process, log)


def _start_worker(stack: Stack, logs: Path, database: str | None, timeout: float) -> Process:
    """A process worker on all queues; its flow runs log to the MLflow server and use this project."""
    env = _env(stack, MLFLOW_TRACKING_URI=stack.mlflow_url, DPA_PROJECT_DIR=str(project_dir()))
    env.pop("MLFLOW_REGISTRY_URI", None)
    log = logs / "worker.log"
    with log.open("ab") as sink:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=project_dir(), env=env,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return _record("worker", worker, log)


def _create_pool_and_queues(stack: Stack) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(stack.api_url) as client:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template), overwrite=True)
        for queue, limit in QUEUES.items():
            try:
                client.create_work_queue(queue, work_pool_name=POOL, concurrency_limit=limit)
            except ObjectAlreadyExists:
                existing = client.read_work_queue_by_name(queue, work_pool_name=POOL)
                client.update_work_queue(existing.id, concurrency_limit=limit)


def _create_automations(stack: Stack) -> None:
    """The automations of `automations/` (crashed-run detection), replacing any of the same name."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

    with SyncPrefectClient(stack.api_url) as client:
        for file in sorted((PROJECT_ROOT / "automations").glob("*.yaml")):
            automation = AutomationCore.model_validate(yaml.safe_load(file.read_text()))
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)


def _deploy(stack: Stack, logs: Path, timeout: float) -> None:
    """`prefect deploy --all` of this checkout's prefect.yaml (the worker runs this checkout's code)."""
    log = logs / "deploy.log"
    with log.open("wb") as sink:
        completed = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=PROJECT_ROOT, stdout=sink,
            stderr=subprocess.STDOUT, env=_env(stack, DPA_PROJECT_ROOT=str(PROJECT_ROOT)), timeout=timeout, check=False,
        )
    if completed.returncode != 0:
        raise StackError(f"`prefect deploy --all` exited {completed.returncode}; log {log}:\n{log.read_text()[-3000:]}")


def _wait_for_worker(stack: Stack, timeout: float) -> None:
    """Until the worker has said hello to the server (it polls the pool as soon as it is up)."""
    from prefect.client.orchestration import SyncPrefectClient

    worker = next(p for p in stack.processes if p.name == "worker")
    deadline = time.monotonic() + timeout
    with SyncPrefectClient(stack.api_url) as client:
        while time.monotonic() < deadline:
            if _alive(worker) is None:
                raise StackError(f"the worker exited; log {worker.log}:\n{Path(worker.log).read_text()[-3000:]}")
            if client.read_workers_for_work_pool(POOL):
                return
            time.sleep(0.5)
    raise StackError(f"the worker did not reach the server in {timeout:.0f}s; log {worker.log}")


def _process_tree(process: Process) -> Iterator[psutil.Process]:
    live = _alive(process)
    if live is None:
        return
    yield live
    try:
        yield from live.children(recursive=True)
    except psutil.NoSuchProcess:
        pass


def down(project: Path | None = None, timeout: float = 20) -> list[Process]:
    """Stop what `dpa up` recorded (worker first, so no new flow run starts), with every descendant:
    SIGTERM, then SIGKILL what lingers. Returns the recorded processes that were still running."""
    stack = read_stack(project)
    if stack is None:
        return []
    running = running_processes(stack)
    for process in reversed(stack.processes):
        targets = list(_process_tree(process))
        for target in targets:
            _signal(target, signal.SIGTERM)
        _, lingering = psutil.wait_procs(targets, timeout=timeout)
        for target in lingering:
            _signal(target, signal.SIGKILL)
        psutil.wait_procs(lingering, timeout=timeout)
    state_file(project).unlink()
    return running


def _signal(process: psutil.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def describe(stack: Stack) -> str:
    """What `dpa up` prints: the two UIs and how to reach the stack from a shell."""
    return (
        f"Prefect UI  {stack.prefect_url}   (deployments: {stack.prefect_url}/deployments; database: {stack.database.split('@')[-1]})\n"
        f"MLflow UI   {stack.mlflow_url}\n"
        f"Logs and pids: {stack_dir()}\n"
        f"From a shell: export PREFECT_API_URL={stack.api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}\n"
        f"Stop with: dpa down"
    )
