"""Fixtures shared by all test packages: a temporary Prefect server and a real S3-compatible
endpoint (moto's standalone server).

Prefect's home is a throwaway directory, set before Prefect is imported, so tests never touch
~/.prefect; its temporary server starts once per session, only when a test asks for it. The moto
server likewise starts once, on 127.0.0.1 and a free port; each test gets its own bucket and fake
credentials in its environment, so tests never see each other's objects and never reach AWS or
the user's ~/.aws. Under `make test`, pytest-xdist schedules the suite by module (ModuleScheduling).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dpa-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # tasks called outside a flow
# One intra-op thread, here and in every server, worker and CLI process a test starts: the tests'
# networks are tiny, and two threads per process, with several processes on two cores, spend
# most of their time waiting for each other (a tiny training step ran about 3x slower).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import boto3  # noqa: E402
import pytest  # noqa: E402
from xdist.scheduler import LoadScopeScheduling  # noqa: E402

from tests.servers import Server, running_server  # noqa: E402

S3_REGION = "us-east-1"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str
    name: str
    region: str = S3_REGION

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (credentials come from the test's environment)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    command = [sys.executable, "-m", "moto.server", "-H", "{host}", "-p", "{port}"]
    with running_server(command, "/moto-api/", log_file=log, timeout=60) as server:
        yield server


@pytest.fixture
def s3_bucket(
    moto_server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> S3Bucket:
    """A fresh empty bucket, with fake credentials (and no ~/.aws) in this test's environment."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    bucket = S3Bucket(moto_server.url, f"test-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A temporary Prefect server for in-process flows (one per session: it takes ~15 s to start)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


SESSION_REGISTRY_URI = os.environ.get("MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def mlflow_stores_from_the_environment() -> Iterator[None]:
    """`configure_tracking` (the CLI and the flows, run in-process here, some in module fixtures) sets
    MLflow's process-wide tracking and registry URIs and exports them. Every test starts and ends with
    MLflow reading its stores from the environment again, and with MLFLOW_TRACKING_URI as it found
    it, so one test's store never answers another's lookups (or a subprocess's)."""
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    _forget_mlflow_uris()
    yield
    _forget_mlflow_uris()
    if tracking_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri


def _forget_mlflow_uris() -> None:
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    tracking._tracking_uri, registry._registry_uri = None, None
    if SESSION_REGISTRY_URI is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory (DPA_PROJECT_DIR, a git repository like the checkout it stands
    in for) with its own SQLite MLflow store; no DVC S3 or study settings leak in from outside."""
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "--quiet", str(root)], check=True)
    monkeypatch.setenv("DPA_PROJECT_DIR", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for name in [n for n in os.environ if n.startswith("DPA_DVC_")] + ["DPA_STUDY_STORAGE", "MLFLOW_EXPERIMENT_ID"]:
        monkeypatch.delenv(name, raising=False)
    return root


INTEGRATION = "tests/integration"


class ModuleScheduling(LoadScopeScheduling):
    """`make test` runs the suite on two pytest-xdist workers: each module goes to one worker whole,
    so its module fixtures are built once and its tests keep their order, and the integration
    package goes whole to one worker, as its tests share a Prefect server and a `dpa up` stack.
    That package goes first: it is the longest unit, so its worker starts on it at once."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::")[0]
        return INTEGRATION if module.startswith(f"{INTEGRATION}/") else module

    def _assign_work_unit(self, node: Any) -> None:
        if INTEGRATION in self.workqueue:
            self.workqueue.move_to_end(INTEGRATION, last=False)
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> ModuleScheduling:
    return ModuleScheduling(config, log)
