"""The gate's rules as Great Expectations 1.x expectations, each with a name and a fix hint.

`data_layer.validation` builds the two tables (the manifest as written, one row per decoded image)
and runs these suites on them; every assertion is GX's, so the rules show up in Data Docs.
"""

from __future__ import annotations

from typing import Literal

import great_expectations as gx
from great_expectations.expectations.row_conditions import Column
from pydantic import BaseModel, ConfigDict, Field

from data_layer.manifest import ABNORMAL, COLUMNS, GROUP, LABEL, LABELS, NORMAL, PATH, REQUIRED_COLUMNS, SPLIT, SPLITS
from data_layer.pixels import DEFAULT_MAX_PIXELS

LINE = "line"
"""Line number in manifest.csv (header = line 1), so a report points at the line to edit."""


class ValidationRules(BaseModel):
    """What the gate demands of a dataset; presets and the CLI override the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_train_normals: int = Field(10, ge=0, description="normal images needed in split=train")
    min_size: int = Field(32, ge=1, description="smallest allowed image side, in pixels")
    expected_channels: Literal[1, 3, "any"] = "any"
    max_examples: int = Field(10, ge=1, description="offending rows listed per failed check")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb limit")
    workers: int | None = Field(None, ge=1, description="decoding threads; None: one per CPU")


def _check(
    expectation: gx.expectations.Expectation, name: str, hint: str, key: str | None = None
) -> gx.expectations.Expectation:
    """Attach the report's name, fix hint ($items/$observed get filled in) and example key."""
    expectation.meta = {"check": name, "hint": hint, "key": key}
    return expectation


def schema_checks() -> list[gx.expectations.Expectation]:
    return [
        _check(
            gx.expectations.ExpectTableColumnsToMatchSet(
                column_set=list(REQUIRED_COLUMNS), exact_match=False
            ),
            "required columns",
            f"add the missing column(s) $items; the header must be {','.join(COLUMNS)}",
        )
    ]


def manifest_checks(rules: ValidationRules) -> list[gx.expectations.Expectation]:
    not_null = [
        _check(
            gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
            f"{column} filled in",
            f"fill in {column} on manifest line(s) $items",
            LINE,
        )
        for column in REQUIRED_COLUMNS
    ]
    train_normals = (Column(SPLIT) == "train") & (Column(LABEL) == NORMAL)
    return not_null + [
        _check(
            gx.expectations.ExpectColumnValuesToBeInSet(column=LABEL, value_set=list(LABELS)),
            "known labels",
            f"use label '{NORMAL}' or '{ABNORMAL}' instead of $items",
            LABEL,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeInSet(column=SPLIT, value_set=list(SPLITS)),
            "known splits",
            f"use split {' / '.join(SPLITS)} instead of $items",
            SPLIT,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeUnique(column=PATH),
            "unique paths",
            "list each file once: remove the duplicate rows of $items",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeNull(column="path_problem"),
            "paths inside the dataset",
            "use paths relative to the dataset directory, without '..' or a leading '/', "
            "and move the files there: $items",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToNotMatchRegex(column="group_splits", regex=r"\+"),
            "each group in one split",
            "move every image of group(s) $items into a single split (a patient in two splits "
            "leaks into the evaluation)",
            GROUP,
        ),
        _check(
            gx.expectations.ExpectTableRowCountToBeBetween(
                min_value=rules.min_train_normals, row_condition=train_normals
            ),
            "enough normal training images",
            f"only $observed normal images in split=train, {rules.min_train_normals} needed: "
            "import more normal images or lower min_train_normals",
        ),
        _check(
            gx.expectations.ExpectColumnDistinctValuesToContainSet(
                column=LABEL, value_set=list(LABELS), row_condition=Column(SPLIT) == "test"
            ),
            "both classes in test",
            "split=test has no $items images; AUROC needs normal and abnormal test images",
        ),
    ]


def image_checks(rules: ValidationRules) -> list[gx.expectations.Expectation]:
    channels = [1, 3] if rules.expected_channels == "any" else [rules.expected_channels]
    return [
        _check(
            gx.expectations.ExpectColumnValuesToBeNull(column="error"),
            "readable images",
            "remove or re-export the unreadable file(s) $items (and fix their manifest rows)",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeInSet(column="channels", value_set=channels),
            "expected channels",
            f"convert $items to {rules.expected_channels} channel(s), or change expected_channels",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="min_side", min_value=rules.min_size
            ),
            "minimum size",
            f"re-export $items with sides of at least {rules.min_size} px, or remove them",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
            "8-bit pixels",
            "the decoder returned non-8-bit pixels for $items: report this as a reader bug",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="std", min_value=0, strict_min=True
            ),
            "not constant",
            "$items are blank (one grey level): re-export them from the source or remove them",
            PATH,
        ),
        _check(
            gx.expectations.ExpectColumnValuesToNotMatchRegex(column="pixel_splits", regex=r"\+"),
            "no identical image in two splits",
            "identical pixels appear in more than one split: keep one copy of $items",
            PATH,
        ),
    ]
