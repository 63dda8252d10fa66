"""The champion served by real `mlflow models serve --env-manager local` processes: base64 image
files in, the same scores as the in-process model out; `path` refused by default with one message
whether or not the file exists, and read only inside an operator's allowed root; malformed requests
and requests over the limits answered 400; the operating threshold chosen per request; hypothesis-drawn
malformed requests of every kind answered 4xx with a message, the server serving valid ones after.

Two servers (default and with an allowed root) start in parallel: each takes tens of seconds."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from tasks.serving.request import PATH_REFUSED, PATHS_DISABLED
from tests.pipeline.conftest import ImageSet, RegisteredDPA
from tests.pipeline.malformed_requests import b64, images_payload, malformed_requests, png_header
from tests.servers import Server, start_server

MAX_ROWS, MAX_IMAGE_BYTES = 16, 50_000
FUZZ_EXAMPLES_PER_KIND = 15
REPO = Path(__file__).resolve().parents[2]


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, str]:
    """(status, response text) of a JSON request; a hang raises TimeoutError after `timeout` seconds."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def invoke(url: str, payload: dict | bytes) -> tuple[int, dict]:
    status, text = post(url, payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return status, json.loads(text)


def model_message(body: dict) -> str:
    """The model's own message: the scoring server prefixes it with a repr of the request's data."""
    return body["message"].partition("\nError: ")[2]


def serve(model_uri: str, mlflow_store: str, log_file: Path, **env: str) -> Server:
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "-h", "{host}", "-p", "{port}", "--env-manager", "local"]
    # the server execs `uvicorn` by name: the venv's bin/ must be on PATH, as in an activated venv
    base = {"MLFLOW_TRACKING_URI": mlflow_store, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DPA_SERVE_MAX_ROWS": str(MAX_ROWS), "DPA_SERVE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
    return start_server(command, "/ping", env={**base, **env}, timeout=180, log_file=log_file)


@pytest.fixture(scope="module")
def servers(champion: RegisteredDPA, image_set: ImageSet, mlflow_store: str, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    """(default server, server with DPA_SERVE_PATH_ROOT = the image set's folder)."""
    logs = tmp_path_factory.mktemp("serve")
    os.environ.pop("DPA_SERVE_PATH_ROOT", None)
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        default = pool.submit(serve, champion.champion_uri, mlflow_store, logs / "default.log")
        rooted = pool.submit(serve, champion.champion_uri, mlflow_store, logs / "rooted.log", DPA_SERVE_PATH_ROOT=str(image_set.root))
        started = []
        for future in (default, rooted):
            try:
                started.append(future.result())
            finally:
                if started and future.done() and future.exception() is None:
                    stack.callback(started[-1].stop)
        yield started[0], started[1]


@pytest.mark.integration
def test_served_champion_scores_like_the_in_process_model(servers, champion: RegisteredDPA, image_set: ImageSet) -> None:
    default, _ = servers
    images = [b64(f.read_bytes()) for f in image_set.files]
    status, body = invoke(default.url, images_payload(images, heatmap=True))
    bad_status, bad_body = invoke(default.url, images_payload([images[0], "bm90IGFuIGltYWdl"]))
    assert status == 200, body
    rows = body["predictions"]
    np.testing.assert_allclose([r["anomaly_score"] for r in rows], image_set.expected_scores(champion.dpa), rtol=1e-5)
    assert [r["is_anomaly"] for r in rows] == [r["anomaly_score"] > champion.threshold for r in rows]
    assert all(base64.b64decode(r["heatmap"]).startswith(b"\x89PNG") for r in rows)
    assert bad_status == 400 and "row 1: the bytes are not a PNG" in bad_body["message"]


@pytest.mark.integration
def test_paths_are_refused_by_default_with_one_message(servers, image_set: ImageSet) -> None:
    default, _ = servers
    answers = [invoke(default.url, images_payload([path], column="path"))
               for path in (str(image_set.files[0]), "/etc/passwd", "/etc/nonexistent", "images/img0.png")]
    assert {status for status, _ in answers} == {400}
    assert {model_message(body) for _, body in answers} == {f"row 0: {PATHS_DISABLED}"}


@pytest.mark.integration
def test_allowed_root_reads_paths_inside_it_only(servers, champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    _, rooted = servers
    inside = [f.relative_to(image_set.root).as_posix() for f in image_set.files[:2]]
    status, body = invoke(rooted.url, images_payload([*inside, str(image_set.files[2])], column="path"))
    assert status == 200, body
    np.testing.assert_allclose([r["anomaly_score"] for r in body["predictions"]],
                               image_set.expected_scores(champion.dpa)[:3], rtol=1e-5)
    outside = tmp_path / "other-patient.png"
    outside.write_bytes(image_set.files[0].read_bytes())
    escape = image_set.root / "images" / "escape.png"
    escape.symlink_to(outside)
    try:
        refused = [invoke(rooted.url, images_payload([path], column="path"))
                   for path in ("images/escape.png", str(outside), "/etc/passwd", "../../../../etc/passwd",
                                "images/missing.png", str(image_set.root / "images"))]
    finally:
        escape.unlink()
    assert {status for status, _ in refused} == {400}
    assert {model_message(body) for _, body in refused} == {f"row 0: {PATH_REFUSED}"}


@pytest.mark.integration
@pytest.mark.parametrize(("payload", "words"), [
    ({"inputs": 5}, "no column 'image' or 'path'"),
    ({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, "no column 'image' or 'path'"),
    ({"dataframe_split": {"columns": ["image"], "data": [[5]]}}, "must be a string"),
    ({"dataframe_split": {"columns": ["image"], "data": []}}, "no rows"),
    (images_payload(["aGVsbG8="] * (MAX_ROWS + 1)), f"exceed this server's limit of {MAX_ROWS}"),
    (images_payload([b64(b"\x89PNG" + bytes(MAX_IMAGE_BYTES))]), f"over this server's limit of {MAX_IMAGE_BYTES:,}"),
    (images_payload([b64(png_header(9000, 9000))]), "decompression-bomb guard"),
    (images_payload(["aGVsbG8="], specificity=2.0), "must be in [0, 1]"),
    (images_payload(["aGVsbG8="], threshold=1.0, specificity=0.5), "not both"),
    (b'{"dataframe_split": ', ""),
])
def test_malformed_requests_answer_400_with_a_message(servers, payload, words: str) -> None:
    status, body = invoke(servers[0].url, payload)
    assert status == 400 and body.get("message") and words in body["message"], body


@pytest.mark.integration
def test_threshold_params_through_the_server(servers, champion: RegisteredDPA, image_set: ImageSet) -> None:
    images = [b64(f.read_bytes()) for f in image_set.files]
    url = servers[0].url
    scores = np.array([r["anomaly_score"] for r in invoke(url, images_payload(images))[1]["predictions"]])
    cut = float(np.median(scores))
    _, by_threshold = invoke(url, images_payload(images, threshold=cut))
    assert [r["is_anomaly"] for r in by_threshold["predictions"]] == (scores > cut).tolist()
    _, by_specificity = invoke(url, images_payload(images, specificity=0.5))
    expected = float(np.quantile(champion.normal_scores, 0.5))
    assert [r["threshold"] for r in by_specificity["predictions"]] == pytest.approx([expected] * len(images))
    assert [r["is_anomaly"] for r in by_specificity["predictions"]] == (scores > expected).tolist()


@pytest.mark.integration
def test_fuzzed_malformed_requests_answer_4xx_and_the_server_keeps_serving(
    servers, champion: RegisteredDPA, image_set: ImageSet, mlflow_store: str
) -> None:
    """Hypothesis-drawn malformed requests of every kind (tests/pipeline/malformed_requests.py) to the
    default server: each answered within 30 s, 4xx, with a message and without a traceback, a server
    path or a file's content (MLflow answers an unexpected model error with 400 *and* the traceback,
    so the traceback is the failure sign here); then valid images still score as before."""
    url = servers[0].url
    files = [f.read_bytes() for f in image_set.files]
    dicom = next(f.read_bytes() for f in image_set.files if f.suffix == ".dcm")
    store = Path(mlflow_store.removeprefix("sqlite:///")).parent
    server_only = ("Traceback", "stack_trace", "site-packages", "root:x:", str(REPO), str(image_set.root), str(store),
                   f"{tempfile.gettempdir()}/tmp")
    for kind, strategy in malformed_requests(files, dicom).items():
        settings(max_examples=FUZZ_EXAMPLES_PER_KIND, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])(given(strategy)(_answered_4xx(url, kind, server_only)))()
    status, body = invoke(url, images_payload([b64(data) for data in files]))
    assert status == 200, body
    np.testing.assert_allclose([r["anomaly_score"] for r in body["predictions"]], image_set.expected_scores(champion.dpa), rtol=1e-5)


@pytest.mark.integration
def test_the_load_benchmark_reports_figures_and_fails_on_errors(servers) -> None:
    """benchmarks/serve_load.py against the running server, with a tiny load; batches over the
    server's row limit make every request fail, and the script exit 1."""
    server = servers[0]
    command = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--url", server.url,
               "--server-pid", str(server.process.pid), "--clients", "3", "--image-size", "32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([*command, "--requests", "12", "--batch-sizes", "1", "4"], capture_output=True, text=True, timeout=120, env=env)
    too_big = subprocess.run([*command, "--requests", "2", "--batch-sizes", str(MAX_ROWS + 1)], capture_output=True, text=True,
                             timeout=120, env=env)
    rows = {fields[0]: fields[1:3] for fields in map(str.split, ok.stdout.splitlines()) if fields[:1] in (["1"], ["4"])}
    assert ok.returncode == 0 and rows == {"1": ["6", "0"], "4": ["6", "0"]}, ok.stdout + ok.stderr
    assert "MiB after the load" in ok.stdout and ok.stdout.rstrip().endswith("OK: no errors, memory within the bound")
    assert too_big.returncode == 1 and "answered 400; first: " in too_big.stdout, too_big.stdout + too_big.stderr
    assert too_big.stdout.rstrip().endswith("FAIL: 2 failed requests")


def _answered_4xx(url: str, kind: str, server_only: tuple[str, ...]) -> Callable[[bytes], None]:
    """The property of one kind of malformed request (strings the request itself holds may be echoed)."""
    def check(body: bytes) -> None:
        status, text = post(url, body, timeout=30)
        leaks = [s for s in server_only if s in text and s.encode() not in body]
        assert 400 <= status < 500 and _message(text) and not leaks, (kind, status, leaks, text[-600:])

    return check


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message") or "")
    except (ValueError, AttributeError):
        return ""
