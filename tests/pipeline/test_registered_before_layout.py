"""A model registered before `tasks/` was split into subpackages keeps loading and scoring.

tests/data/model_registered_before_layout/ is a pyfunc model directory as `log_dpa_model` wrote it
before the move (its `code/` copy of the project left out: in a process that has already imported
this checkout's packages, as `dpa score` and the promotion gate have, those are what its
models-from-code file imports). The .json beside it holds four PNGs and the scores that code served.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tasks.registry.mlflow_model import load_dpa_scorer, load_scorer
from tasks.registry.pyfunc_model import SCORE
from tasks.serving.request import IMAGE

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = DATA / "model_registered_before_layout"
EXPECTED = json.loads((DATA / "model_registered_before_layout.json").read_text())


def test_it_loads_with_todays_code_and_serves_the_same_scores() -> None:
    assert "from tasks.pyfunc_model import DPAPyfuncModel" in (MODEL / "dpa_model_code.py").read_text()
    served = load_scorer(str(MODEL)).predict(pd.DataFrame({IMAGE: EXPECTED["images_png_b64"]}))
    assert served[SCORE].tolist() == pytest.approx(EXPECTED["scores"], rel=1e-6)
    assert load_dpa_scorer(str(MODEL)).threshold == 1.0


def test_without_the_compatibility_module_it_would_be_orphaned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tasks.pyfunc_model", None)  # as if tasks/pyfunc_model.py were deleted
    with pytest.raises(MlflowException, match="Failed to import code model.*tasks.pyfunc_model"):
        load_scorer(str(MODEL))
