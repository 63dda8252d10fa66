"""prefect.yaml against a real Prefect server on PostgreSQL: `prefect deploy --all` creates the four
deployments as documented, and a UI-style run of `train-on-demand` is picked up by a real process
worker, trains, and registers a model version in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.tiny import tiny_training
from tests.integration.conftest import BIN, REPO, PrefectServer

pytestmark = pytest.mark.integration

POOL = "dpa-pool"
TRAINING_QUEUE = "training"
GPU_DEPLOYMENTS = ("scheduled-retraining", "train-on-demand", "tune")


@pytest.fixture(scope="module")
def deployments(prefect_server: PrefectServer) -> dict[str, dict]:
    """The operator's steps from docs/deployments.md, then the deployments as the API returns them."""
    prefect_server.cli("work-pool", "create", POOL, "--type", "process")
    prefect_server.cli("work-queue", "create", TRAINING_QUEUE, "--pool", POOL, "--limit", "1")
    prefect_server.cli("deploy", "--all", env={"DPA_PROJECT_ROOT": str(REPO)})
    return {d["name"]: d for d in prefect_server.api("POST", "/deployments/filter", {})}


def test_deploy_all_creates_the_documented_deployments(prefect_server: PrefectServer, deployments: dict[str, dict]) -> None:
    assert set(deployments) == {"scheduled-retraining", "train-on-demand", "batch-scoring", "tune"}
    entrypoints = {name: d["entrypoint"] for name, d in deployments.items()}
    assert entrypoints == {
        "scheduled-retraining": "flows/training.py:training_pipeline",
        "train-on-demand": "flows/training.py:training_pipeline",
        "batch-scoring": "flows/scoring.py:batch_scoring",
        "tune": "flows/tuning.py:tuning_pipeline",
    }
    schedules = {
        name: [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in d["schedules"]]
        for name, d in deployments.items()
    }
    assert schedules == {
        "scheduled-retraining": [("0 3 * * 1", "UTC", True)],
        "train-on-demand": [],
        "batch-scoring": [("0 2 * * *", "UTC", False)],
        "tune": [],
    }
    assert deployments["scheduled-retraining"]["parameters"] == {"params": {"preset": "demo", "dataset": {"importer": "dvc"}}}
    for name, d in deployments.items():
        assert d["work_pool_name"] == POOL
        assert d["enforce_parameter_schema"] is True
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    # GPU-heavy runs: one at a time per deployment, and one at a time across them (shared queue).
    for name in GPU_DEPLOYMENTS:
        d = deployments[name]
        assert d["global_concurrency_limit"]["limit"] == 1, name
        assert d["concurrency_options"]["collision_strategy"] == "ENQUEUE", name
        assert d["work_queue_name"] == TRAINING_QUEUE, name
    assert prefect_server.api("GET", f"/work_pools/{POOL}/queues/{TRAINING_QUEUE}")["concurrency_limit"] == 1

    # The run form is the PipelineParams model, and the server enforces it.
    schema = deployments["train-on-demand"]["parameter_openapi_schema"]
    form = schema["definitions"]["PipelineParams"]["properties"]
    assert {"preset", "overrides", "dataset", "model_name"} <= set(form)
    bad = httpx.post(
        f"{prefect_server.api_url}/deployments/{deployments['train-on-demand']['id']}/create_flow_run",
        json={"parameters": {"params": {"preset": 5}}}, timeout=30,
    )
    assert bad.status_code == 409 and "preset" in bad.text, bad.text


def test_train_on_demand_runs_on_a_process_worker(
    prefect_server: PrefectServer, deployments: dict[str, dict], project: Path, tmp_path: Path
) -> None:
    model_name = f"dpa-it-{uuid.uuid4().hex[:8]}"
    deployment_id = deployments["train-on-demand"]["id"]
    run = prefect_server.api(
        "POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": {"params": tiny_training(model_name)}}
    )
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker_env = {
        **os.environ, **prefect_server.env,
        "DPA_PROJECT_DIR": str(project), "MLFLOW_TRACKING_URI": tracking_uri,
    }
    log = tmp_path / "worker.log"
    command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--work-queue", TRAINING_QUEUE,
               "--run-once", "--limit", "1"]
    with log.open("wb") as sink:  # --run-once: poll once, run what it got, exit when that run ends
        worker = subprocess.Popen(command, cwd=tmp_path, env=worker_env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        worker.wait(timeout=300)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    state = prefect_server.api("GET", f"/flow_runs/{run['id']}")["state"]
    output = log.read_text(errors="replace")[-6000:]
    assert worker.returncode == 0 and state["type"] == "COMPLETED", f"worker exit {worker.returncode}, {state}\n{output}"

    versions = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_model_versions(
        f"name='{model_name}'"
    )
    assert len(versions) == 1
    assert (project / "data.dvc").is_file()  # the imported dataset became the versioned data/
