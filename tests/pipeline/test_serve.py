"""The champion served by a real `mlflow models serve --env-manager local` process: base64 image
files in, the same scores as the in-process model out (one server: it takes tens of seconds)."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.conftest import ImageSet, RegisteredDPA
from tests.servers import running_server


def invoke(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.integration
def test_served_champion_scores_like_the_in_process_model(
    champion: RegisteredDPA, image_set: ImageSet, mlflow_store: str, tmp_path
) -> None:
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion.champion_uri,
               "-h", "{host}", "-p", "{port}", "--env-manager", "local"]
    images = [base64.b64encode(f.read_bytes()).decode("ascii") for f in image_set.files]
    # the server execs `uvicorn` by name: the venv's bin/ must be on PATH, as in an activated venv
    env = {"MLFLOW_TRACKING_URI": mlflow_store, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with running_server(command, "/ping", env=env, timeout=120,
                        log_file=tmp_path / "serve.log") as server:
        status, body = invoke(server.url, {
            "dataframe_split": {"columns": ["image"], "data": [[image] for image in images]},
            "params": {"heatmap": True},
        })
        bad_status, bad_body = invoke(server.url, {"dataframe_split": {"columns": ["image"], "data": [[images[0]], ["bm90IGFuIGltYWdl"]]}})
    assert status == 200, body
    rows = body["predictions"]
    np.testing.assert_allclose([r["anomaly_score"] for r in rows], image_set.expected_scores(champion.dpa), rtol=1e-5)
    assert [r["is_anomaly"] for r in rows] == [r["anomaly_score"] > champion.threshold for r in rows]
    assert all(base64.b64decode(r["heatmap"]).startswith(b"\x89PNG") for r in rows)
    assert bad_status == 400 and "row 1: the bytes are not a PNG" in bad_body["message"]
