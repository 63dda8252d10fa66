"""The run form (the Prefect UI's parameters form is generated from this schema): the preset is a
drop-down of configs/, the overrides editor has an example, the data sources are named variants,
and a wrong preset or override key is refused when the parameters are read, naming it."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from flows.training import training_pipeline
from tasks.config import CONFIG_DIR, DataSource, PipelineParams


@pytest.fixture(scope="module")
def form() -> dict:
    """The deployment's parameter schema, as `prefect deploy` sends it to the server."""
    return parameter_schema(training_pipeline).model_dump_for_openapi()


def test_preset_is_an_enum_of_the_configs(form: dict) -> None:
    preset = form["definitions"]["PipelineParams"]["properties"]["preset"]
    assert preset["enum"] == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "demo" in preset["enum"] and preset["default"] == "demo"


def test_overrides_have_an_example(form: dict) -> None:
    overrides = form["definitions"]["PipelineParams"]["properties"]["overrides"]
    example = overrides["examples"][0]
    assert "dpa.train.stab_iters" in example
    PipelineParams(overrides=example)  # the example itself is a valid run


def test_data_sources_are_named_variants(form: dict) -> None:
    dataset = form["definitions"]["PipelineParams"]["properties"]["dataset"]
    variants = [form["definitions"][o["$ref"].rsplit("/", 1)[1]] for o in dataset["anyOf"] if "$ref" in o]
    assert {"DVC-versioned data", "Synthetic phantoms", "Image folder", "NIH ChestX-ray14"} <= {v["title"] for v in variants}
    importers = {v["properties"]["importer"]["const"] for v in variants}
    assert importers == {"dvc", "phantoms", "folder", "csv", "medmnist", "cifar10", "svhn", "nih", "camelyon16"}
    assert {"type": "null"} in dataset["anyOf"]


def test_a_chosen_variant_keeps_its_options() -> None:
    params = PipelineParams.model_validate({"dataset": {"importer": "phantoms", "n_train_normal": 40}})
    assert isinstance(params.dataset, DataSource) and params.dataset.model_extra == {"n_train_normal": 40}
    assert PipelineParams(dataset=DataSource(importer="dvc")).dataset.importer == "dvc"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"preset": "demo_typo"}, "unknown preset 'demo_typo'"),
        ({"overrides": {"dpa.train.stab_iterz": 5}}, "unknown override key(s) dpa.train.stab_iterz"),
        ({"overrides": {"preprocess.sise": 16}}, "preprocess.sise"),
        ({"overrides": {"dpa.train.stab_iters": "many"}}, "dpa.train.stab_iters"),
        ({"dataset": {"importer": "ftp"}}, "ftp"),
    ],
)
def test_wrong_preset_or_key_is_refused_naming_it(params: dict, named: str) -> None:
    with pytest.raises(ValidationError) as error:
        PipelineParams.model_validate(params)
    assert named in str(error.value)


def test_a_flow_run_with_a_wrong_key_fails_before_any_task() -> None:
    """Prefect validates the flow's parameters before the flow body runs: no task is ever submitted."""
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="dpa.train.stab_iterz"):
        training_pipeline.validate_parameters({"params": {"preset": "demo", "overrides": {"dpa.train.stab_iterz": 5}}})
