"""The Great Expectations gate that runs before anything trains (docs/architecture.md, "Dataset on disk").

Two tables are validated with GX 1.x expectations:

- the manifest as written (required columns, domains, nulls, unique and safe paths, patient
  groups confined to one split, enough normal training images, both classes in test);
- one row per image, built here by decoding every file once through `read_image` (readable,
  channels, size, 8-bit, not constant, no identical pixels shared by two splits). Scoring and
  serving check each image against the same per-image rules (`data_layer.admission`).

Pandas only derives columns (decode facts, the splits a group or a pixel hash spans); GX does every
assertion (the suites are in `data_layer.expectations`), so the rules show up in GX's Data Docs
next to the offending rows (built to read offline by `data_layer.data_docs`). A failure becomes a
`ValidationReport` entry with a count, the first rows and a fix hint; `ensure_valid` turns a failed
report into `DataValidationError`, which the training flow lets stop the run.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from pydantic import BaseModel

from data_layer.admission import image_facts
from data_layer.data_docs import build_offline_data_docs, data_docs_context
from data_layer.expectations import LINE, ValidationRules, image_checks, manifest_checks, schema_checks
from data_layer.images import pixel_hash, read_image
from data_layer.manifest import (
    GROUP,
    MANIFEST_NAME,
    PATH,
    REQUIRED_COLUMNS,
    SPLIT,
    ManifestError,
    path_problem,
    resolve_path,
)
from data_layer.pixels import ImageReadError

REPORT_NAME = "validation_report.json"
DOCS_DIR = "data_docs"
INDEX_COLUMNS = (LINE, PATH, SPLIT, GROUP)
"""Columns shown for every offending row, in both tables."""


class CheckResult(BaseModel):
    """One expectation's outcome; `examples` are the first offending rows (or missing values)."""

    table: str
    check: str
    expectation: str
    success: bool
    count: int = 0
    observed: Any = None
    examples: list[Any] = []
    hint: str | None = None


class ValidationReport(BaseModel):
    """The gate's verdict, saved as JSON beside GX's Data Docs and logged with the run."""

    dataset_dir: str
    success: bool
    rules: ValidationRules
    checks: list[CheckResult]
    json_path: str | None = None
    docs_path: str | None = None

    @property
    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.success]

    def summary(self) -> str:
        """Multi-line, human-first text: what failed, where, and how to fix it."""
        failures = self.failures
        head = (
            f"dataset {self.dataset_dir}: "
            + (f"{len(failures)} of {len(self.checks)} checks failed" if failures else
               f"all {len(self.checks)} checks passed")
        )
        lines = [head]
        for failure in failures:
            lines.append(f"- [{failure.table}] {failure.check}: {_extent(failure)}")
            rows = [row for row in failure.examples if isinstance(row, dict)]
            lines.extend(f"    {_describe(row)}" for row in rows)
            lines.append(f"    fix: {failure.hint}")
        lines.extend(
            f"{name}: {path}"
            for name, path in (("report", self.json_path), ("data docs", self.docs_path))
            if path
        )
        return "\n".join(lines)


class DataValidationError(Exception):
    """The dataset failed the gate; carries the full report for artifacts and the UI."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[type[DataValidationError], tuple[ValidationReport]]:
        # Prefect pickles task exceptions; the default would rebuild from the message string.
        return type(self), (self.report,)


def validate_dataset(
    dataset_dir: str | Path,
    rules: ValidationRules | None = None,
    report_dir: str | Path | None = None,
) -> ValidationReport:
    """Run the gate; with `report_dir`, also write the JSON report and GX Data Docs there.

    Raises ManifestError only when there is no readable manifest.csv at all (nothing to check).
    """
    rules = rules or ValidationRules()
    dataset_dir = Path(dataset_dir)
    manifest = _manifest_table(dataset_dir)
    complete = set(REQUIRED_COLUMNS) <= set(manifest.columns)
    tables = {"manifest": (manifest, schema_checks() + (manifest_checks(rules) if complete else []))}
    if complete:
        tables["images"] = (_image_table(dataset_dir, manifest, rules), image_checks(rules))
    docs_dir = Path(report_dir) / DOCS_DIR if report_dir is not None else None
    checks = _run_gx(tables, rules, docs_dir)
    report = ValidationReport(
        dataset_dir=str(dataset_dir),
        success=all(check.success for check in checks),
        rules=rules,
        checks=checks,
    )
    if report_dir is not None:
        _save(report, Path(report_dir), docs_dir)
    return report


def ensure_valid(
    dataset_dir: str | Path,
    rules: ValidationRules | None = None,
    report_dir: str | Path | None = None,
) -> ValidationReport:
    """`validate_dataset`, raising `DataValidationError` on failure so a flow stops here."""
    report = validate_dataset(dataset_dir, rules, report_dir)
    if not report.success:
        raise DataValidationError(report)
    return report


def _manifest_table(dataset_dir: Path) -> pd.DataFrame:
    """manifest.csv as written (blank cells become nulls), plus the columns GX asserts on.

    Read here rather than with `read_manifest`, which refuses bad paths outright: the gate must
    see every problem so it can report all of them at once.
    """
    file = dataset_dir / MANIFEST_NAME
    try:
        raw = pd.read_csv(file, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise ManifestError(f"{file}: not found. Create it with an importer.") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not a readable CSV ({exc}). Re-create it.") from exc
    table = raw.mask(raw.apply(lambda column: column.str.strip() == ""))
    table.insert(0, LINE, np.arange(2, len(table) + 2))
    if PATH in table.columns:
        table["path_problem"] = table[PATH].map(path_problem, na_action="ignore")
    if {GROUP, SPLIT} <= set(table.columns):
        table["group_splits"] = _splits_sharing(table, GROUP)
    return table


def _image_table(
    dataset_dir: Path, manifest: pd.DataFrame, rules: ValidationRules
) -> pd.DataFrame:
    """One row per manifest row with a safe path: decode facts, or the decode error.

    Rows whose path is null or unsafe are left out here because the manifest checks report them.
    """
    safe = manifest[PATH].notna() & manifest["path_problem"].isna()
    rows = manifest.loc[safe, list(INDEX_COLUMNS)]
    paths = [resolve_path(dataset_dir, rel) for rel in rows[PATH]]
    with ThreadPoolExecutor(max_workers=rules.workers or os.cpu_count()) as pool:
        facts = list(pool.map(lambda path: _inspect(path, rules.max_pixels), paths))
    columns = ["error", "channels", "min_side", "dtype", "std", "pixel_hash"]
    table = pd.concat(
        [rows.reset_index(drop=True), pd.DataFrame(facts, columns=columns)], axis=1
    )
    table["pixel_splits"] = _splits_sharing(table, "pixel_hash")
    return table


def _inspect(path: Path, max_pixels: int) -> dict[str, Any]:
    """Decode once and keep only the facts the expectations need."""
    try:
        image = read_image(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        return {"error": str(exc)}
    return {**image_facts(image), "pixel_hash": pixel_hash(image)}


def _splits_sharing(table: pd.DataFrame, key: str) -> pd.Series:
    """For each row, the sorted splits of all rows with the same `key`, e.g. 'test+train'."""
    spans = table.groupby(key)[SPLIT].agg(lambda splits: "+".join(sorted(set(splits.dropna()))))
    return table[key].map(spans)


def _run_gx(
    tables: dict[str, tuple[pd.DataFrame, list]], rules: ValidationRules, docs_dir: Path | None
) -> list[CheckResult]:
    """Validate each table against its suite; results stay in the context for Data Docs."""
    context = data_docs_context(docs_dir)
    source = context.data_sources.add_pandas("dataset")
    checks: list[CheckResult] = []
    for name, (frame, expectations) in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": rules.max_examples,
                "unexpected_index_column_names": list(INDEX_COLUMNS),
            },
        )
        order = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
        outcomes = sorted(result.results, key=lambda outcome: order[outcome.expectation_config.id])
        checks.extend(_check_result(name, outcome) for outcome in outcomes)
    if docs_dir is not None:
        build_offline_data_docs(context, docs_dir)
    return checks


def _check_result(table: str, outcome: Any) -> CheckResult:
    """Turn one GX ExpectationValidationResult into the report's entry."""
    config, result = outcome.expectation_config, outcome.result or {}
    check = CheckResult(
        table=table,
        check=config.meta["check"],
        expectation=f"{config.type}({config.kwargs.get('column', '')})",
        success=bool(outcome.success),
        observed=_plain(result.get("observed_value")),
    )
    if check.success:
        return check
    check.examples = _examples(result)
    counted = result.get("unexpected_count") or result.get("missing_count")
    check.count = int(counted or len(check.examples) or 1)
    check.hint = Template(config.meta["hint"]).safe_substitute(
        items=_items(check.examples, config.meta["key"]), observed=check.observed
    )
    error = (outcome.exception_info or {}).get("exception_message")
    if error:
        check.hint = f"the check could not run ({error}); {check.hint}"
    return check


def _examples(result: dict) -> list[Any]:
    """First offending rows (dicts) for row checks; missing values for set/column checks."""
    if "partial_unexpected_index_list" in result:
        return [_plain(row) for row in result["partial_unexpected_index_list"]]
    missing = result.get("details", {}).get("mismatched", {}).get("missing")
    return _plain(missing or result.get("partial_missing_list") or [])


def _items(examples: list[Any], key: str | None) -> str:
    values = [example.get(key) if isinstance(example, dict) else example for example in examples]
    unique = list(dict.fromkeys(str(value) for value in values if value is not None))
    return ", ".join(unique) if unique else "(see report)"


def _plain(value: Any) -> Any:
    """JSON-safe copy of GX output (numpy scalars, NaN)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _extent(failure: CheckResult) -> str:
    """How big the failure is: offending rows, missing values, or what GX observed."""
    if any(isinstance(example, dict) for example in failure.examples):
        return f"{failure.count} offending row(s), first {len(failure.examples)}:"
    if failure.examples:
        return "missing " + ", ".join(map(repr, failure.examples))
    return f"observed {failure.observed!r}"


def _describe(row: dict[str, Any]) -> str:
    """'line 7, path=..., split=..., group=..., <checked column>=...' for one offending row."""
    keys = [key for key in INDEX_COLUMNS[1:] if key in row]
    keys += [key for key in row if key not in INDEX_COLUMNS]
    line = [f"line {row[LINE]}"] if LINE in row else []
    return ", ".join(line + [f"{key}={row[key]!r}" for key in keys])


def _save(report: ValidationReport, report_dir: Path, docs_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    report.json_path = str(report_dir / REPORT_NAME)
    report.docs_path = str(docs_dir / "index.html")
    Path(report.json_path).write_text(report.model_dump_json(indent=2), encoding="utf-8")
