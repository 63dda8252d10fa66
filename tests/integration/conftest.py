"""Real processes for the integration tests: PostgreSQL databases, a Prefect server on PostgreSQL,
CLI calls against it, and one `dpa up` stack.

The Prefect server starts once for this package (it takes ~20 s; it stops after the package, so
it takes no CPU from the rest of the suite) on 127.0.0.1 with its own PREFECT_HOME and a fresh
PostgreSQL database that is dropped afterwards. The `dpa up` stack (50-90 s on 2 cores) is shared
too, by test_stack.py and the browser test; the test that stops it is marked `ends_shared_stack`
and runs after every other test that uses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg2
import pytest
from psycopg2 import sql

from tests.servers import Server, free_port, running_server

if TYPE_CHECKING:
    from tasks.runtime.stack import Stack

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh, uniquely named database on the local PostgreSQL, dropped (forcibly) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        drop_database(name)


def drop_database(name: str) -> None:
    _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _admin(statement: sql.Composable) -> None:
    connection = psycopg2.connect(dbname="postgres", **POSTGRES)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def postgres_url(database: str, driver: str = "postgresql") -> str:
    return f"{driver}://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{database}"


def run_command(args: list[str], env: Mapping[str, str], *, cwd: Path = REPO, timeout: float = 300) -> str:
    """Run a command with exactly `env` to completion; fail the test with its output when it exits non-zero."""
    completed = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"`{' '.join(args)}` exited {completed.returncode}:\n{output[-6000:]}"
    return output


@dataclass(frozen=True)
class PrefectServer:
    server: Server
    home: Path

    @property
    def api_url(self) -> str:
        return f"{self.server.url}/api"

    @property
    def env(self) -> dict[str, str]:
        """What a client process (CLI, worker, flow run) needs to talk to this server."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def cli(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
        """`prefect <args>` against this server, run from the repository root."""
        return run_command([str(BIN / "prefect"), *args], {**os.environ, **self.env, **(env or {})}, timeout=timeout)

    def api(self, method: str, path: str, payload: Any = None) -> Any:
        """One REST call, as the UI makes it."""
        response = httpx.request(method, f"{self.api_url}{path}", json=payload, timeout=30)
        assert response.is_success, f"{method} {path} -> {response.status_code}: {response.text}"
        return response.json()


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on PostgreSQL (asyncpg). The scheduler service is off, so no
    scheduled run is created behind a test's back; schedules are still stored and checked."""
    home = tmp_path_factory.mktemp("prefect-home")
    with postgres_database("prefect") as database:
        env = {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url(database, "postgresql+asyncpg"),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        }
        command = [str(BIN / "prefect"), "server", "start", "--host", "{host}", "--port", "{port}"]
        with running_server(command, "/api/health", env=env, log_file=home / "server.log", timeout=120) as server:
            yield PrefectServer(server, home)


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple["Stack", dict[str, str]]]:
    """`dpa up` for a fresh project on free ports (exactly the CLI a person runs), its Prefect server
    on a fresh PostgreSQL database as in production, and `dpa down` afterwards; yields the recorded
    stack and the environment the CLI ran with."""
    from tasks.runtime.stack import read_stack

    root = tmp_path_factory.mktemp("stack")
    project = root / "project"
    project.mkdir()
    subprocess.run(["git", "init", "--quiet", str(project)], check=True)
    with postgres_database("dpa_stack") as database:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DPA_", "MLFLOW_", "PREFECT_API"))}
        env.update(DPA_PROJECT_DIR=str(project), DPA_PREFECT_DB_URL=postgres_url(database, "postgresql+asyncpg"),
                   PREFECT_HOME=str(root / "prefect-client"))
        up = [str(BIN / "dpa"), "up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
        try:
            output = run_command(up, env, timeout=600)
            running = read_stack(project)
            assert running is not None and running.prefect_url in output and running.mlflow_url in output, output
            yield running, env
        finally:
            subprocess.run([str(BIN / "dpa"), "down"], env=env, cwd=REPO, capture_output=True, timeout=300, check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests that stop the shared stack to just after the last other test that uses it."""
    enders = [item for item in items if item.get_closest_marker("ends_shared_stack")]
    others = [item for item in items if item not in enders]
    users = [i for i, item in enumerate(others) if "stack" in getattr(item, "fixturenames", ())]
    if enders and users:
        after_last_user = users[-1] + 1
        items[:] = others[:after_last_user] + enders + others[after_last_user:]
