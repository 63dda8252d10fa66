"""Where fanned-out tasks run (tuning trials, benchmark cells): threads or processes on this
machine, or a Dask cluster (`prefect-dask`), or Ray when prefect-ray is installed.

A cluster address (given, or $DPA_DASK_ADDRESS) picks Dask unless a runner is named. Dask workers
are other processes, often on other machines: before any task runs, each worker takes this
process's tracking settings (MLflow URIs, project directory), so child runs land in the same
store as their parent run whatever environment the worker was started with.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from distributed import WorkerPlugin
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from tasks.paths import project_dir
from tasks.registry.tracking import tracking_uri

DASK_ADDRESS_ENV = "DPA_DASK_ADDRESS"
RAY = ("prefect_ray", "RayTaskRunner", "prefect-ray")
PLUGIN_NAME = "dpa-environment"


def forwarded_environment() -> dict[str, str]:
    """The settings a worker needs to log where this process logs."""
    uri = tracking_uri()
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": os.environ.get("MLFLOW_REGISTRY_URI") or uri,
            "DPA_PROJECT_DIR": str(project_dir())}


class ForwardedEnvironment(WorkerPlugin):
    """Sets the flow's settings in each worker process (also in workers that join later)."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def setup(self, worker: Any) -> None:
        os.environ.update(self.env)


class ProjectDaskTaskRunner(DaskTaskRunner):
    """`DaskTaskRunner` whose workers take the flow's tracking settings first. Registering the
    plugin is also the check that every worker can import this project."""

    def __enter__(self) -> ProjectDaskTaskRunner:
        super().__enter__()
        try:
            self.client.register_plugin(ForwardedEnvironment(forwarded_environment()), name=PLUGIN_NAME)
        except Exception as error:
            address = self.client.scheduler.address
            self.__exit__(None, None, None)
            raise RuntimeError(
                f"the Dask workers of {address} cannot take this project's tasks ({type(error).__name__}: {error}); start "
                "each `dask worker` in an environment with this checkout installed (`make setup`) or on its PYTHONPATH"
            ) from error
        return self


def resolve_runner(kind: str | None, cluster_address: str | None) -> tuple[str, str | None]:
    """(runner kind, address): no kind means Dask when an address is given or $DPA_DASK_ADDRESS is
    set, else threads; Dask without an address starts a local cluster."""
    dask_address = cluster_address or os.environ.get(DASK_ADDRESS_ENV) or None
    kind = kind or ("dask" if dask_address else "threads")
    if kind == "dask":
        return kind, dask_address
    if cluster_address and kind != "ray":
        raise ValueError(f"cluster_address is for task_runner 'dask' or 'ray', not {kind!r}")
    return kind, cluster_address


def make_task_runner(kind: str | None, max_workers: int, cluster_address: str | None = None) -> TaskRunner:
    """The task runner `resolve_runner` picks; Ray's package is imported only when asked for."""
    kind, address = resolve_runner(kind, cluster_address)
    if kind == "dask":
        return ProjectDaskTaskRunner(address=address)
    if kind == "ray":
        module, name, package = RAY
        try:
            runner = getattr(importlib.import_module(module), name)
        except ImportError:
            raise RuntimeError(f"task_runner='ray' needs the {package} package: pip install {package}") from None
        return runner(address=address)
    return ThreadPoolTaskRunner(max_workers) if kind == "threads" else ProcessPoolTaskRunner(max_workers)
