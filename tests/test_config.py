"""Presets resolve into one typed RunConfig; overrides reach it; importers accept the presets' data sources."""

import inspect

import pytest

from data_layer import importers
from data_layer.phantoms import PhantomSpec
from tasks.config import CONFIG_DIR, PipelineParams, apply_overrides, flatten, resolve_run_config

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_resolves_and_its_data_source_fits_its_importer(name: str) -> None:
    cfg = resolve_run_config(PipelineParams(preset=name))
    assert cfg.preprocess.channels == cfg.dpa.network.image_channels
    options = dict(cfg.dataset.model_extra or {})
    if cfg.dataset.importer == "phantoms":
        PhantomSpec(**options)
    else:
        inspect.signature(getattr(importers, f"import_{cfg.dataset.importer}")).bind_partial(**options)


def test_overrides_and_dataset_reach_the_resolved_config() -> None:
    cfg = resolve_run_config(
        PipelineParams(preset="demo", overrides={"dpa.train.lr": 0.01, "dataset.seed": 3}, model_name="m")
    )
    assert cfg.dpa.train.lr == 0.01 and cfg.dataset.model_extra["seed"] == 3 and cfg.registry.model_name == "m"


def test_unknown_preset_and_bad_override_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: .*demo"):
        resolve_run_config(PipelineParams(preset="nope"))
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"a": 1}, {"a.b": 2})


def test_flatten_gives_mlflow_param_names() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


@pytest.mark.parametrize(
    ("override", "message"), [({"preprocess.channels": 3}, "image_channels"), ({"preprocess.size": 16}, "max_res")]
)
def test_preprocessing_must_fit_the_network_before_any_data_is_touched(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_run_config(PipelineParams(preset="demo", overrides=override))
