"""Run a real server (Prefect, MLflow, moto S3, ...) as a subprocess: for `dpa up` and the integration tests.

The server binds 127.0.0.1 on a free port, is polled on a health URL until it answers 2xx, and is
stopped with its whole process group (servers such as MLflow and Prefect fork workers). Output
goes to a log file whose tail is put into the error when the server dies or never gets healthy.

    with running_server([sys.executable, "-m", "moto.server", "-H", "{host}", "-p", "{port}"],
                        health_path="/moto-api/") as server:
        use(server.url)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; a tiny race is accepted in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log_file: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers past `timeout` seconds."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout)


def start_server(
    command: Sequence[str],
    health_path: str = "/",
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 60.0,
    log_file: str | Path | None = None,
    port: int | None = None,
) -> Server:
    """Start `command` ('{host}'/'{port}' in its arguments are filled in; the port is a free one
    unless given) and wait until `GET <url><health_path>` answers 2xx. `env` adds to (or
    overrides) the current environment. The server runs in its own session, so it outlives its
    caller and its whole process group can be stopped.
    """
    port = port or free_port()
    args = [arg.replace("{host}", HOST).replace("{port}", str(port)) for arg in command]
    if log_file is None:
        handle, log_file = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(handle)
    log = Path(log_file)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
    server = Server(process, f"http://{HOST}:{port}", port, log)
    try:
        _wait_healthy(server, health_path, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def running_server(command: Sequence[str], health_path: str = "/", **options) -> Iterator[Server]:
    """`start_server` as a context manager that always stops the server."""
    server = start_server(command, health_path, **options)
    try:
        yield server
    finally:
        server.stop()


def _wait_healthy(server: Server, health_path: str, timeout: float) -> None:
    url = server.url + health_path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {server.process.returncode} before {url} answered; "
                f"log {server.log_file}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(
        f"{url} not healthy after {timeout:.0f}s; log {server.log_file}:\n{server.log_tail()}"
    )


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
