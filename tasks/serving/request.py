"""What a client of the served model may send, and the limits: checked before any pixel is decoded.

Serving is a network boundary (docs/serving.md). By default a request carries images only as
base64 file bytes (`image`); the `path` column is refused with one message whatever the path, so
an answer never tells whether a server file exists. An operator who wants clients to name files
sets `DPA_SERVE_PATH_ROOT` to a folder: a `path` (relative to it, or absolute) is then read only
when it resolves, symlinks followed, to a file inside that folder. Batch scoring (`dpa score`)
reads its own files and does not go through these checks.

Limits (environment variables read when the model loads, so set them before `mlflow models serve`):
`DPA_SERVE_MAX_ROWS` (images per request, default 256), `DPA_SERVE_MAX_IMAGE_BYTES` (decoded
bytes per image, default 64 MiB), `DPA_SERVE_MAX_PIXELS` (pixels per image from its header,
default `data_layer.pixels.DEFAULT_MAX_PIXELS`).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, PositiveInt

from data_layer.pixels import DEFAULT_MAX_PIXELS

IMAGE, PATH = "image", "path"
PATH_ROOT_ENV, MAX_ROWS_ENV = "DPA_SERVE_PATH_ROOT", "DPA_SERVE_MAX_ROWS"
MAX_IMAGE_BYTES_ENV, MAX_PIXELS_ENV = "DPA_SERVE_MAX_IMAGE_BYTES", "DPA_SERVE_MAX_PIXELS"
DEFAULT_MAX_ROWS, DEFAULT_MAX_IMAGE_BYTES = 256, 64 * 2**20

PATHS_DISABLED = (
    f"column {PATH!r} is disabled on this server: send the file's bytes base64-encoded in column {IMAGE!r} "
    f"(an operator can allow paths under one folder with {PATH_ROOT_ENV})"
)
PATH_REFUSED = (
    f"column {PATH!r}: not a file inside the folder this server allows ({PATH_ROOT_ENV}); "
    f"or send the file's bytes base64-encoded in column {IMAGE!r}"
)
REQUEST_SHAPE = (
    f'send a table with a column {IMAGE!r} (base64 file bytes), e.g. '
    f'{{"dataframe_split": {{"columns": ["{IMAGE}"], "data": [["<base64>"]]}}}}'
)


class RequestError(ValueError):
    """The request as a whole is malformed (HTTP 400); row problems are ValueErrors naming the row."""


class ServingLimits(BaseModel):
    """The operator's settings for what a request may contain."""

    path_root: Path | None = None
    max_rows: PositiveInt = DEFAULT_MAX_ROWS
    max_image_bytes: PositiveInt = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingLimits:
        """Limits from `DPA_SERVE_*`; a bad value fails the model load, naming the variable."""
        root = env.get(PATH_ROOT_ENV, "")
        if root and not Path(root).is_dir():
            raise ValueError(f"{PATH_ROOT_ENV}={root!r} is not a directory: set it to the folder clients may read")
        values = {"path_root": Path(root).resolve() if root else None}
        for field, name in (("max_rows", MAX_ROWS_ENV), ("max_image_bytes", MAX_IMAGE_BYTES_ENV), ("max_pixels", MAX_PIXELS_ENV)):
            if env.get(name):
                try:
                    values[field] = int(env[name])
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r}: expected a positive integer") from None
        return cls(**values)


def request_rows(model_input: Any, limits: ServingLimits) -> list[tuple[str | None, str | None]]:
    """(image, path) per row of a request, after checking its shape, its columns and the row limit."""
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(f"expected a table of images, got {type(model_input).__name__}; {REQUEST_SHAPE}")
    unknown = sorted(str(c) for c in model_input.columns if c not in (IMAGE, PATH))
    if unknown:
        raise RequestError(f"unknown column(s) {unknown}; {REQUEST_SHAPE}")
    if IMAGE not in model_input.columns and PATH not in model_input.columns:
        raise RequestError(f"no column {IMAGE!r} or {PATH!r}; {REQUEST_SHAPE}")
    if len(model_input) == 0:
        raise RequestError(f"the request has no rows; {REQUEST_SHAPE}")
    if len(model_input) > limits.max_rows:
        raise RequestError(
            f"{len(model_input)} rows exceed this server's limit of {limits.max_rows} per request "
            f"({MAX_ROWS_ENV}); split the batch"
        )
    return list(zip(_cells(model_input, IMAGE), _cells(model_input, PATH)))


def _cells(frame: pd.DataFrame, name: str) -> list[Any]:
    if name not in frame.columns:
        return [None] * len(frame)
    return [_missing_to_none(cell) for cell in frame[name].tolist()]


def _missing_to_none(cell: Any) -> Any:
    return None if cell is None or (isinstance(cell, float) and math.isnan(cell)) or (isinstance(cell, str) and cell == "") else cell


def row_source(image: Any, path: Any, limits: ServingLimits) -> bytes | Path:
    """One row → the decoded file bytes, or an allowed file path; ValueError says what is wrong."""
    for name, cell in ((IMAGE, image), (PATH, path)):
        if cell is not None and not isinstance(cell, str):
            raise ValueError(f"column {name!r} must be a string, got {type(cell).__name__}")
    if (image is None) == (path is None):
        raise ValueError(f"give exactly one of the columns {IMAGE!r} (base64 file bytes) or {PATH!r}")
    return decode_base64(image, limits.max_image_bytes) if image is not None else allowed_path(path, limits.path_root)


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 cell, refused from its length before decoding when they would be too many."""
    if len(text) // 4 * 3 > max_bytes + 2:
        raise ValueError(
            f"column {IMAGE!r}: the image is about {len(text) // 4 * 3:,} bytes, over this server's limit of "
            f"{max_bytes:,} ({MAX_IMAGE_BYTES_ENV})"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"column {IMAGE!r} is not valid base64 ({exc}); send base64.b64encode(file_bytes)") from exc
    if len(data) > max_bytes:
        raise ValueError(f"column {IMAGE!r}: {len(data):,} bytes exceed this server's limit of {max_bytes:,} ({MAX_IMAGE_BYTES_ENV})")
    return data


def allowed_path(path: str, root: Path | None) -> Path:
    """`path` resolved (symlinks followed) when it is a file inside `root`; otherwise one message that
    says nothing about whether the file exists."""
    if root is None:
        raise ValueError(PATHS_DISABLED)
    try:
        resolved = (root / path).resolve()
        inside = resolved.is_relative_to(root) and resolved.is_file()
    except (OSError, ValueError):  # NUL bytes, loops, names too long: refused like any other path
        inside = False
    if not inside:
        raise ValueError(PATH_REFUSED)
    return resolved
