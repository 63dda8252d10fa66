"""The UI path in a real browser (Debian's Chromium driven by Playwright, no browser download): `dpa up`
brings up the stack (the one test_stack.py checks, shared), a person starts a custom `train-on-demand`
run through the generated form (preset chosen in the drop-down, tiny overrides typed into the overrides
editor, a model name), the stack's worker runs it, and the MLflow UI shows the run's test AUROC and
the registered version with its alias.

Screenshots (the form, the finished flow run, the MLflow model page) are kept in the test's tmp folder.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tasks.config import PRESETS
from tasks.runtime.stack import Stack
from tests.tiny import TINY_OVERRIDES

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"  # installed by `make test` when missing (tests/setup_system.sh)
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def fill_run_form(page: Page, stack: Stack, deployment_id: str, model_name: str, shots: Path) -> str:
    """What a person does on Deployments → train-on-demand → Run → Custom run; returns the new flow run's id."""
    page.goto(f"{stack.prefect_url}/deployments/deployment/{deployment_id}/run", timeout=120_000)
    expect(page.get_by_text("Preset (Optional)")).to_be_visible(timeout=120_000)  # the form rendered

    preset = page.locator(".p-select-button__value").first
    expect(preset).to_have_text("demo")  # the preset drop-down's default
    page.locator(".p-select-button__control").first.focus()
    page.keyboard.press("ArrowDown")  # opens the drop-down (a plain click does not, in Playwright)
    expect(page.get_by_role("option")).to_have_count(len(PRESETS))  # one option per preset in configs/
    page.get_by_role("option", name="demo", exact=True).click()
    expect(preset).to_have_text("demo")

    overrides = {**TINY_OVERRIDES, "registry.auroc_floor": 0.0}
    editor = page.locator(".schema-form-property-kind-json textarea").first
    editor.click()
    editor.press("Control+a")
    editor.fill(json.dumps(overrides))

    page.get_by_role("button", name="str", exact=True).last.click()  # Model Name: str instead of None
    page.locator("textarea").last.fill(model_name)  # the text box that appears below it
    page.screenshot(path=shots / "run-form.png", full_page=True)
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/deployments/deployment/*?tab=Runs", timeout=60_000)  # back on the deployment, run listed
    runs = httpx.post(f"{stack.api_url}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}, timeout=30).json()
    assert len(runs) == 1, runs
    return runs[0]["id"]


def wait_finished(stack: Stack, flow_run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = httpx.get(f"{stack.api_url}/flow_runs/{flow_run_id}", timeout=30).json()["state"]
        if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not finished after {RUN_TIMEOUT_S}s")


def test_custom_run_from_the_prefect_ui_reaches_the_mlflow_ui(
    browser: Browser, stack: tuple[Stack, dict[str, str]], tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    model_name = f"dpa-ui-{uuid.uuid4().hex[:8]}"
    running, _ = stack  # the shared `dpa up` (tests/integration/conftest.py)
    deployments = httpx.post(f"{running.api_url}/deployments/filter", json={}, timeout=30).json()
    deployment_id = next(d["id"] for d in deployments if d["name"] == "train-on-demand")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})

    flow_run_id = fill_run_form(page, running, deployment_id, model_name, shots)
    params = httpx.get(f"{running.api_url}/flow_runs/{flow_run_id}", timeout=30).json()["parameters"]["params"]
    assert params["preset"] == "demo" and params["model_name"] == model_name
    assert params["overrides"]["dpa.train.stab_iters"] == TINY_OVERRIDES["dpa.train.stab_iters"]

    state = wait_finished(running, flow_run_id)
    worker_log = Path(next(p.log for p in running.processes if p.name == "worker")).read_text(errors="replace")
    assert state["type"] == "COMPLETED", f"{state}\n{worker_log[-5000:]}"
    page.goto(f"{running.prefect_url}/runs/flow-run/{flow_run_id}", timeout=120_000)
    expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)
    page.screenshot(path=shots / "flow-run.png", full_page=True)

    client = MlflowClient(tracking_uri=running.mlflow_url, registry_uri=running.mlflow_url)
    version = client.get_model_version_by_alias(model_name, "challenger")
    run = client.get_run(version.run_id)
    auroc = run.data.metrics["test_auroc"]

    page.goto(f"{running.mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", timeout=120_000)
    expect(page.get_by_text("test_auroc").first).to_be_visible(timeout=120_000)
    expect(page.get_by_text(str(round(auroc, 3))[:4]).first).to_be_visible(timeout=30_000)
    page.screenshot(path=shots / "mlflow-run.png", full_page=True)

    page.goto(f"{running.mlflow_url}/#/models/{model_name}", timeout=120_000)
    expect(page.get_by_text(f"Version {version.version}").first).to_be_visible(timeout=120_000)
    expect(page.get_by_text("challenger").first).to_be_visible(timeout=30_000)
    page.screenshot(path=shots / "mlflow-model.png", full_page=True)
