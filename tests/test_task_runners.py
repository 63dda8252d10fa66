"""Where fanned-out tasks run: a cluster address means Dask unless a runner is named."""

import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from tasks.runtime.task_runners import DASK_ADDRESS_ENV, ProjectDaskTaskRunner, make_task_runner, resolve_runner


def test_a_cluster_address_picks_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    assert resolve_runner(None, None) == ("threads", None)
    assert resolve_runner(None, "tcp://scheduler:8786") == ("dask", "tcp://scheduler:8786")
    assert resolve_runner("dask", None) == ("dask", None)  # a local cluster
    monkeypatch.setenv(DASK_ADDRESS_ENV, "tcp://from-env:8786")
    assert resolve_runner(None, None) == ("dask", "tcp://from-env:8786")
    assert resolve_runner("dask", "tcp://given:8786") == ("dask", "tcp://given:8786")
    assert resolve_runner("threads", None) == ("threads", None)  # a named local runner ignores the environment


def test_runners_are_built_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    runner = make_task_runner(None, 2, "tcp://scheduler:8786")
    assert isinstance(runner, ProjectDaskTaskRunner) and runner.address == "tcp://scheduler:8786"
    assert isinstance(make_task_runner(None, 3), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner("processes", 3), ProcessPoolTaskRunner)


def test_a_wrong_combination_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="pip install prefect-ray"):
        make_task_runner("ray", 2, "ray://head:10001")
    with pytest.raises(ValueError, match="cluster_address is for task_runner 'dask' or 'ray'"):
        make_task_runner("threads", 2, "tcp://scheduler:8786")
