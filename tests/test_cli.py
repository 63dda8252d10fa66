"""The `dpa` command line: data commands end to end, overrides parsing, Prefect's defaults."""

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app, parse_overrides

runner = CliRunner()


def test_overrides_are_dotted_keys_with_yaml_values() -> None:
    assert parse_overrides(["dpa.train.lr=0.001", "a.b={16: {r12: 1}}", "x=true"]) == {
        "dpa.train.lr": 0.001, "a.b": {16: {"r12": 1}}, "x": True,
    }
    with pytest.raises(typer.BadParameter):
        parse_overrides(["no-equals-sign"])


def test_phantoms_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "phantoms"
    spec = ["-s", "n_train_normal=30", "-s", "n_val_normal=5", "-s", "n_test_normal=10",
            "-s", "n_val_abnormal=5", "-s", "n_test_abnormal=10", "-s", "size=32"]
    result = runner.invoke(app, ["data", "phantoms", "--out", str(out), *spec])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.csv").is_file()

    result = runner.invoke(app, ["data", "validate", str(out), "--report-dir", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.output

    first = next((out / "images").rglob("*.png"))
    first.write_bytes(b"not a png")
    result = runner.invoke(app, ["data", "validate", str(out)])
    assert result.exit_code == 1
    assert first.name in result.output


def test_prefect_telemetry_is_off_unless_the_user_turns_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED")
    runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
