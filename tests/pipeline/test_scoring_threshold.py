"""Batch scoring takes the serving params' operating point: `dpa score --threshold/--specificity`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.pipeline.conftest import ImageSet, RegisteredDPA


def test_dpa_score_takes_threshold_and_specificity(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    def run(*options: str) -> pd.DataFrame:
        out = tmp_path / "-".join(options or ("default",))
        result = CliRunner().invoke(app, ["score", "--model", champion.champion_uri, "--input", str(image_set.root),
                                          "--out", str(out), "--no-heatmaps", *options])
        assert result.exit_code == 0, result.output
        return pd.read_csv(out / "scores.csv")

    default = run()
    cut = float(default["anomaly_score"].median())
    assert run("--threshold", str(cut))["is_anomaly"].tolist() == (default["anomaly_score"] > cut).tolist()
    expected = np.quantile(champion.normal_scores, 0.5)
    assert run("--specificity", "0.5")["is_anomaly"].tolist() == (default["anomaly_score"] > expected).tolist()
    assert default["is_anomaly"].tolist() == (default["anomaly_score"] > champion.threshold).tolist()


def test_out_of_range_operating_points_are_refused(champion: RegisteredDPA, image_set: ImageSet, tmp_path: Path) -> None:
    for option, value in (("--threshold", "-5"), ("--specificity", "1.5"), ("--specificity", "-0.1")):
        result = CliRunner().invoke(app, ["score", "--model", champion.champion_uri, "--input", str(image_set.root),
                                          "--out", str(tmp_path / "out"), option, value])
        assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert not (tmp_path / "out").exists()
    from tasks.registry.mlflow_model import load_dpa_scorer

    with pytest.raises(ValueError, match="must be a finite score ≥ 0"):
        load_dpa_scorer(champion.champion_uri, threshold=-5.0)
