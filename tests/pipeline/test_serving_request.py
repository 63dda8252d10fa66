"""Request checks of the served model, without a model: the allowed root, the limits, the shapes."""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
import pytest

from tasks.serving.request import (
    PATH_REFUSED,
    PATHS_DISABLED,
    RequestError,
    ServingLimits,
    allowed_path,
    decode_base64,
    request_rows,
    row_source,
)


def test_paths_resolve_inside_the_root_only(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret.png"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    outside.write_bytes(b"x")
    (root / "link.png").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "sub" / "a.png")
    root = root.resolve()
    assert allowed_path("sub/a.png", root) == root / "sub" / "a.png"
    assert allowed_path("inner.png", root) == root / "sub" / "a.png"
    assert allowed_path(str(root / "sub" / "a.png"), root) == root / "sub" / "a.png"
    for path in ("link.png", str(outside), "../secret.png", "sub", "missing.png", "/etc/passwd", "a\0b"):
        with pytest.raises(ValueError) as caught:
            allowed_path(path, root)
        assert str(caught.value) == PATH_REFUSED
    with pytest.raises(ValueError, match="disabled on this server"):
        allowed_path("sub/a.png", None)
    assert PATHS_DISABLED != PATH_REFUSED


def test_limits_come_from_the_environment(tmp_path: Path) -> None:
    limits = ServingLimits.from_env({"DPA_SERVE_PATH_ROOT": str(tmp_path), "DPA_SERVE_MAX_ROWS": "3"})
    assert limits.path_root == tmp_path.resolve() and limits.max_rows == 3
    with pytest.raises(ValueError, match="DPA_SERVE_MAX_ROWS='many'"):
        ServingLimits.from_env({"DPA_SERVE_MAX_ROWS": "many"})
    with pytest.raises(ValueError, match="is not a directory"):
        ServingLimits.from_env({"DPA_SERVE_PATH_ROOT": str(tmp_path / "nope")})


def test_shapes_rows_and_bytes_are_checked_before_decoding() -> None:
    limits = ServingLimits(max_rows=2, max_image_bytes=10)
    with pytest.raises(RequestError, match="expected a table"):
        request_rows([1, 2], limits)
    with pytest.raises(RequestError, match="limit of 2"):
        request_rows(pd.DataFrame({"image": ["a", "b", "c"]}), limits)
    assert request_rows(pd.DataFrame({"image": ["a", float("nan")], "path": [None, "p"]}), limits) == [("a", None), (None, "p")]
    with pytest.raises(ValueError, match="over this server's limit of 10"):
        decode_base64(base64.b64encode(bytes(100)).decode(), 10)
    assert decode_base64(base64.b64encode(bytes(10)).decode(), 10) == bytes(10)
    with pytest.raises(ValueError, match="must be a string, got list"):
        row_source([1], None, limits)
