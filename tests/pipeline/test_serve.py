"""The champion served by real `mlflow models serve --env-manager local` processes: base64 image
files in, the same scores as the in-process model out; `path` refused by default with one message
whether or not the file exists, and read only inside an operator's allowed root; malformed requests
and requests over the limits answered 400; the operating threshold chosen per request.

Two servers (default and with an allowed root) start in parallel: each takes tens of seconds."""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from tasks.serving_request import PATH_REFUSED, PATHS_DISABLED
from tests.pipeline.conftest import ImageSet, RegisteredDPA
from tests.servers import Server, start_server

MAX_ROWS, MAX_IMAGE_BYTES = 16, 50_000


def invoke(url: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def model_message(body: dict) -> str:
    """The model's own message: the scoring server prefixes it with a repr of the request's data."""
    return body["message"].partition("\nError: ")[2]


def images_payload(cells: list, column: str = "image", **params) -> dict:
    payload = {"dataframe_split": {"columns": [column], "data": [[cell] for cell in cells]}}
    return {**payload, "params": params} if params else payload


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels (a decompression-bomb probe: no pixel data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


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
