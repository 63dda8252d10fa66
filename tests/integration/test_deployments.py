"""prefect.yaml against a real Prefect server on PostgreSQL: `prefect deploy --all` creates the four
deployments as documented; a UI-style run of `train-on-demand` is picked up by a real process
worker, trains, and registers a model version in MLflow; a run whose worker is killed with kill -9
is marked crashed, and the same parameters started again resume from its checkpoint; and score
drift seen by batch scoring starts one retraining run per cooldown through the deployment trigger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pandas as pd
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from data_layer.preprocessing import preprocess_dataset
from model.trainer import CHECKPOINT_NAME, train_dpa
from tasks.config import PipelineParams, resolve_run_config
from tasks.monitoring.monitor import DRIFT_EVENT, MONITORING_SUFFIX, read_batch
from tasks.registry.mlflow_model import CHAMPION, load_dpa_scorer
from tasks.registry.tracking import ensure_experiment
from tasks.serving.dicom_results import model_uri_of_report
from tests.integration.conftest import BIN, REPO, PrefectServer, run_command
from tests.integration.drift_client import MODEL_NAME
from tests.model_core.conftest import blob_images, tiny_config
from tests.pipeline.conftest import RES, register
from tests.pipeline.test_dicom_results import radiograph
from tests.tiny import tiny_training

pytestmark = pytest.mark.integration

POOL = "dpa-pool"
TRAINING_QUEUE = "training"
GPU_DEPLOYMENTS = ("scheduled-retraining", "train-on-demand", "tune")
CRASH_AUTOMATION = REPO / "automations" / "crash-unresponsive-runs.yaml"
ITERATIONS = 200
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Training threads of the killed and resumed runs and of the in-process reference: the same count,
so the weights can be compared bit for bit (and tiny convolutions run ~20x faster than with 2
threads on a shared 2-core machine)."""
T = TypeVar("T")


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
    assert deployments["scheduled-retraining"]["parameters"] == {"params": {"preset": "demo", "dataset": {"importer": "dvc", "workspace": "production"}}}
    for name, d in deployments.items():
        assert d["work_pool_name"] == POOL
        assert d["enforce_parameter_schema"] is True
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert d["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name  # crash detection

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


def start_worker(
    prefect_server: PrefectServer, project: Path, tracking_uri: str, log: Path, queue: str = TRAINING_QUEUE, **env: str
) -> subprocess.Popen:
    """A real process worker on `queue` (--run-once: poll once, run what it got, exit when that run
    ends), in its own session like a service, logging to `log`; `env` adds to its environment."""
    env = {**os.environ, **prefect_server.env, "DPA_PROJECT_DIR": str(project), "MLFLOW_TRACKING_URI": tracking_uri, **env}
    command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--work-queue", queue,
               "--run-once", "--limit", "1"]
    with log.open("wb") as sink:
        return subprocess.Popen(command, cwd=log.parent, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_worker_to_the_end(worker: subprocess.Popen, timeout: float = 300) -> None:
    try:
        worker.wait(timeout=timeout)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def create_run(prefect_server: PrefectServer, deployment: dict, params: dict) -> str:
    """A run of `deployment` as the UI creates it; its id."""
    return prefect_server.api("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"params": params}})["id"]


def state_of(prefect_server: PrefectServer, run_id: str) -> dict:
    return prefect_server.api("GET", f"/flow_runs/{run_id}")["state"]


def test_train_on_demand_runs_on_a_process_worker(
    prefect_server: PrefectServer, deployments: dict[str, dict], project: Path, tmp_path: Path
) -> None:
    model_name = f"dpa-it-{uuid.uuid4().hex[:8]}"
    run_id = create_run(prefect_server, deployments["train-on-demand"], tiny_training(model_name))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker = start_worker(prefect_server, project, tracking_uri, tmp_path / "worker.log")
    run_worker_to_the_end(worker)

    state = state_of(prefect_server, run_id)
    output = (tmp_path / "worker.log").read_text(errors="replace")[-6000:]
    assert worker.returncode == 0 and state["type"] == "COMPLETED", f"worker exit {worker.returncode}, {state}\n{output}"

    versions = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_model_versions(
        f"name='{model_name}'"
    )
    assert len(versions) == 1
    assert (project / "datasets" / "demo.dvc").is_file()  # the import became a version of the preset's workspace


def test_batch_scoring_runs_on_a_worker_before_and_after_a_promotion(
    prefect_server: PrefectServer, deployments: dict[str, dict], project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run parameters (no edit of the deployment) on the day a new champion arrives: each
    version writes its own folder, where a fixed output folder used to refuse the new version; the
    DICOM input of the inbox gets its Structured Report and heat-map image (`dicom_out`)."""
    name = f"dpa-scoring-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", ensure_experiment("batch-scoring-test"))
    versions = [register(train_dpa(tiny_config(res=RES, stab_iters=20, seed=seed), blob_images(32, RES, seed=seed),
                                   progress=False), name) for seed in (0, 1)]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = [image[0].numpy() for image in blob_images(7, 2 * RES, seed=5)]
    for i, image in enumerate(images[:6]):
        Image.fromarray(image).save(inbox / f"img{i}.png")
    radiograph(inbox / "IM0001", images[6], "MONOCHROME2", "window", PatientID="PAT-1")
    deployment = deployments["batch-scoring"]
    params = {"model_uri": f"models:/{name}@{CHAMPION}", "input": str(inbox), "out": str(tmp_path / "scores"), "monitor": False,
              "dicom_out": str(tmp_path / "dicom")}
    for version in versions:
        MlflowClient().set_registered_model_alias(name, CHAMPION, version)
        run_id = prefect_server.api("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": params})["id"]
        log = tmp_path / f"worker-v{version}.log"
        worker = start_worker(prefect_server, project, os.environ["MLFLOW_TRACKING_URI"], log, queue=deployment["work_queue_name"])
        run_worker_to_the_end(worker)
        assert state_of(prefect_server, run_id)["type"] == "COMPLETED", log.read_text(errors="replace")[-6000:]
        run_folder = f"{datetime.now(UTC).date().isoformat()}_{name}-v{version}"
        scores = pd.read_csv(tmp_path / "scores" / run_folder / "scores.csv", dtype=str, keep_default_na=False)
        assert len(scores) == 7 and set(scores["model_version"]) == {version} and (scores["error"] == "").all()
        assert model_uri_of_report(tmp_path / "dicom" / run_folder / "IM0001.sr.dcm") == f"models:/{name}/{version}"


def wait_for(what: str, probe: Callable[[], T], timeout: float = 90, alive: subprocess.Popen | None = None) -> T:
    """Poll `probe` until it returns something truthy (the server works asynchronously); fail naming
    `what`, or the process `alive` if it exits first."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert alive is None or alive.poll() is None, f"the worker exited ({alive.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)
    return found


def kill_tree(root: subprocess.Popen) -> list[int]:
    """SIGKILL a process and every descendant at once, as a container's or a systemd unit's end
    does: the flow run Prefect started in a session of its own dies with its worker."""
    parent = psutil.Process(root.pid)
    tree = [parent, *parent.children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=30)
    root.wait()
    return [p.pid for p in tree]


def test_a_run_whose_worker_is_killed_is_crashed_and_the_same_parameters_resume(
    prefect_server: PrefectServer, deployments: dict[str, dict], project: Path, tmp_path: Path
) -> None:
    """kill -9 of the worker during training → the run is marked CRASHED by the shipped automation
    (no heartbeat; the test shortens its window from 90 s to 40 s and removes it before the rerun, so
    a slow heartbeat of the live rerun cannot crash it) → a new run with the same parameters resumes
    from the checkpoint, ends with the weights of an uninterrupted training, and registers one version."""
    model_name = f"dpa-kill-{uuid.uuid4().hex[:8]}"
    params = tiny_training(model_name, **{"dpa.train.stab_iters": ITERATIONS, "dpa.train.checkpoint_every": 10})
    automation = {**yaml.safe_load(CRASH_AUTOMATION.read_text()), "name": f"crash-{model_name}"}
    automation["trigger"]["within"] = 40
    prefect_server.cli("automation", "create", "--from-json", json.dumps(automation))
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]  # the project's store, which this process reads too

    killed_run = create_run(prefect_server, deployments["train-on-demand"], params)
    worker = start_worker(prefect_server, project, tracking_uri, tmp_path / "killed-worker.log", **ONE_THREAD)
    checkpoint = wait_for("checkpoint", lambda: next(project.glob(f".dpa/checkpoints/*/*/{CHECKPOINT_NAME}"), None), 300, worker)
    pids = kill_tree(worker)
    _, _, killed_at = torch.load(checkpoint, weights_only=True)["position"]
    assert len(pids) >= 2 and 0 < killed_at < ITERATIONS, (pids, killed_at)  # the worker and its flow run, mid-training
    crashed = wait_for("CRASHED state", lambda: state if (state := state_of(prefect_server, killed_run))["type"] == "CRASHED" else None, 120)
    prefect_server.cli("automation", "delete", automation["name"])

    rerun = create_run(prefect_server, deployments["train-on-demand"], params)
    worker = start_worker(prefect_server, project, tracking_uri, tmp_path / "worker.log", **ONE_THREAD)
    run_worker_to_the_end(worker)
    output = (tmp_path / "worker.log").read_text(errors="replace")
    assert state_of(prefect_server, rerun)["type"] == "COMPLETED", output[-6000:]
    assert crashed["message"].startswith("No heartbeat"), crashed
    assert f"{CHECKPOINT_NAME} at iteration {killed_at}/{ITERATIONS}" in output, output[-6000:]  # resumed, not restarted

    versions = MlflowClient().search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1, [v.version for v in versions]
    version = versions[0]
    cfg = resolve_run_config(PipelineParams.model_validate(params))
    data_version = MlflowClient().get_run(version.run_id).data.tags["data_version"]
    data = preprocess_dataset(project / "datasets" / "demo", cfg.preprocess, project / ".dpa" / "cache", data_version)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(ONE_THREAD["OMP_NUM_THREADS"]))
    try:
        uninterrupted = train_dpa(cfg.dpa, data.subset(split="train", label="normal").images, progress=False).state_dict()
    finally:
        torch.set_num_threads(threads)
    resumed = load_dpa_scorer(f"models:/{model_name}/{version.version}").dpa.state_dict()
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k].cpu()) for k in uninterrupted), "resumed weights differ"


def test_score_drift_starts_one_retraining_run_per_cooldown(
    prefect_server: PrefectServer, deployments: dict[str, dict], project: Path, tmp_path: Path
) -> None:
    """A scoring process (tests/integration/drift_client.py) runs the batch-scoring flow against this
    server on an in-distribution batch and on two batches from a shifted acquisition. The two drift
    events arrive within the trigger's 24 h cooldown: exactly one retraining run. A third drift event
    dated after the cooldown starts a second one, which also shows the second event was seen and
    dropped, not lost. The runs are only created (asserted through the API), not executed: they would
    retrain the demo preset on the project's DVC data, which the worker test above covers."""
    retraining = deployments["scheduled-retraining"]
    (automation,) = [a for a in prefect_server.api("POST", "/automations/filter", {}) if a["name"] == "retrain-on-score-drift"]
    trigger = automation["trigger"]
    assert (trigger["posture"], trigger["threshold"], trigger["within"]) == ("Reactive", 1, 86400.0)
    assert trigger["match"] == {"prefect.resource.id": f"dpa.model.{MODEL_NAME}"} and trigger["expect"] == [DRIFT_EVENT]
    assert [(a["type"], a["deployment_id"]) for a in automation["actions"]] == [("run-deployment", retraining["id"])]

    def retraining_runs() -> list[dict]:
        return prefect_server.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [retraining["id"]]}}})

    def events(name: str, **criteria: Any) -> list[dict]:
        page = prefect_server.api("POST", "/events/filter", {"filter": {"event": {"name": [name]}, **criteria}, "limit": 50})
        return page["events"]

    assert retraining_runs() == []
    try:
        run_command([sys.executable, "-m", "tests.integration.drift_client", str(tmp_path)],
                    {**os.environ, **prefect_server.env}, timeout=600)
        batches = json.loads((tmp_path / "batches.json").read_text())
        digests = {name: read_batch(csv).input_digest for name, csv in batches.items()}

        # MLflow: one monitoring run per batch; the shifted ones drifted and name their event.
        client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name(MODEL_NAME + MONITORING_SUFFIX)
        runs = {r.data.tags["input_digest"]: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == set(digests.values())
        verdicts = {name: runs[digest].data.tags["drift_verdict"] for name, digest in digests.items()}
        assert verdicts == {"in-distribution": "in distribution", "shifted-a": "drifted", "shifted-b": "drifted"}
        assert "prefect_event_id" not in runs[digests["in-distribution"]].data.tags

        # Prefect: the two drift events (none for the in-distribution batch), with the statistics.
        ours = {"resource": {"id": [f"dpa.model.{MODEL_NAME}"]}}  # other tests' models drift too
        drift = sorted(wait_for("two drift events", lambda: len(found := events(DRIFT_EVENT, **ours)) >= 2 and found),
                       key=lambda e: e["occurred"])
        assert [e["payload"]["input_digest"] for e in drift] == [digests["shifted-a"], digests["shifted-b"]]
        assert [e["id"] for e in drift] == [runs[digests[n]].data.tags["prefect_event_id"] for n in ("shifted-a", "shifted-b")]
        assert drift[0]["resource"]["dpa.model.version"] == "1" and drift[0]["payload"]["drifted"] is True
        assert {"monitoring-run", "flow-run"} <= {r["prefect.resource.role"] for r in drift[0]["related"]}
        assert drift[0]["payload"]["ks_pvalue"] == runs[digests["shifted-a"]].data.metrics["ks_pvalue"]
        artifacts = prefect_server.api("POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["score-drift"]}}})
        assert len(artifacts) == 3 and sum("drifted" in a["description"] for a in artifacts) == 2

        first = wait_for("the retraining run", retraining_runs)
        assert len(first) == 1 and first[0]["parameters"] == retraining["parameters"]

        # After the cooldown (an event dated past it): a second retraining, fired by that event.
        late = {"id": str(uuid.uuid4()), "event": DRIFT_EVENT, "resource": drift[0]["resource"],
                "occurred": (datetime.fromisoformat(drift[0]["occurred"]) + timedelta(days=1, minutes=1)).isoformat()}
        httpx.post(f"{prefect_server.api_url}/events", json=[late], timeout=30).raise_for_status()
        wait_for("a second retraining run", lambda: len(retraining_runs()) == 2)
        fired = wait_for("two automation firings", lambda: len(found := events(
            "prefect.automation.triggered", resource={"id": [f"prefect.automation.{automation['id']}"]})) == 2 and found)
        causes = {r["prefect.resource.id"] for e in fired for r in e["related"] if r["prefect.resource.role"] == "triggering-event"}
        assert causes == {f"prefect.event.{drift[0]['id']}", f"prefect.event.{late['id']}"}
        assert len(retraining_runs()) == 2
    finally:
        for run in retraining_runs():  # so no worker of a later test picks them up
            httpx.delete(f"{prefect_server.api_url}/flow_runs/{run['id']}", timeout=30).raise_for_status()
