"""Where things live: the checkout, and the project directory whose data, caches and stores a run
uses. Light to import (no GX, torch or MLflow), so `dpa up` and `dpa down` start in a second."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_dir() -> Path:
    """Where the active dataset (data/), caches and the embedded MLflow store live: DPA_PROJECT_DIR or the repo."""
    return Path(os.environ.get("DPA_PROJECT_DIR", PROJECT_ROOT)).resolve()
