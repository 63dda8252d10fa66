"""Does this process run the code a model version was logged with? Say so when it does not.

Every version carries the project packages it was trained with (`code/`, MLflow's code_paths), and
`mlflow models serve` runs exactly those, in a process of its own. A load inside a process that has
already imported this checkout (`dpa score`, the batch-scoring flow, the gate's re-scoring of the
champion) cannot switch: Python keeps one `model` package per process. So after such a load, the
project modules this process has imported are compared, byte for byte, with the version's copies.
A difference is named, file by file, in a warning, or refused with `DPA_MODEL_CODE=refuse`.

MLflow also prepends the version's `code/` to `sys.path` at every load; `sys_path_kept` undoes that,
so a long-lived process that loads many versions does not grow its import path.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.paths import PROJECT_ROOT

MODE_ENV = "DPA_MODEL_CODE"
MODES = ("warn", "refuse")
PACKAGES = ("model", "data_layer", "tasks")
"""The project packages a version logs (tasks.registry.mlflow_model)."""
_SHOWN = 5

log = logging.getLogger(__name__)


class ModelCodeMismatch(RuntimeError):
    """This process runs other project code than the version was logged with, and refusal was asked for."""


@contextmanager
def sys_path_kept() -> Iterator[None]:
    """Put `sys.path` back as it was once the block ends (MLflow's loader prepends to it)."""
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def differing_files(code_dir: Path) -> list[str]:
    """The project modules imported in this process whose source is missing from, or differs from,
    the copy under `code_dir` (paths relative to the project root)."""
    differing = set()
    for module in list(sys.modules.values()):
        source = Path(getattr(module, "__file__", None) or "/")
        try:
            relative = source.resolve().relative_to(PROJECT_ROOT)
        except ValueError:
            continue  # not this checkout's code (third-party, or the version's own copy)
        if relative.parts[0] not in PACKAGES or source.suffix != ".py":
            continue
        logged = code_dir / relative
        if not logged.is_file() or logged.read_bytes() != source.read_bytes():
            differing.add(relative.as_posix())
    return sorted(differing)


def check_model_code(model_uri: str, code_dir: Path | None) -> list[str]:
    """Compare after a load; warn (the default) or raise `ModelCodeMismatch` (DPA_MODEL_CODE=refuse)."""
    mode = os.environ.get(MODE_ENV, "warn")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    if code_dir is None or not code_dir.is_dir():
        return []
    differing = differing_files(code_dir)
    if differing:
        shown = ", ".join(differing[:_SHOWN]) + (f" and {len(differing) - _SHOWN} more" if len(differing) > _SHOWN else "")
        message = (
            f"{model_uri} was logged with other project code than this process runs ({shown} differ), so its scores "
            "here may differ from its own code's (`mlflow models serve` runs that). Score it from a checkout of the "
            f"version's `git_commit` run tag, or retrain it; {MODE_ENV}=refuse refuses such loads"
        )
        if mode == "refuse":
            raise ModelCodeMismatch(message)
        log.warning(message)
    return differing
