"""The Great Expectations gate as a Prefect task: stop the flow before training, with a report."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from data_layer.validation import DataValidationError, ValidationReport, ValidationRules, validate_dataset


def _markdown(report: ValidationReport) -> str:
    rows = "\n".join(
        f"| {'✅' if c.success else '❌'} | {c.table} | {c.check} | {c.count} | {c.hint or ''} |" for c in report.checks
    )
    verdict = "passed" if report.success else "**FAILED** — nothing was trained or registered"
    return (
        f"## Data validation {verdict}\n\n`{report.dataset_dir}`\n\n"
        f"| ok | table | check | offending | fix |\n|---|---|---|---|---|\n{rows}\n\n"
        f"```\n{report.summary()}\n```\n"
    )


@task(name="validate-dataset", retries=0)
def validate(dataset_dir: Path, rules: ValidationRules, report_dir: Path) -> ValidationReport:
    """Run the gate, publish its summary, and raise `DataValidationError` when it fails (no retry: bad data stays bad)."""
    report = validate_dataset(dataset_dir, rules, report_dir)
    create_markdown_artifact(_markdown(report), key="data-validation", description="Great Expectations gate")
    if not report.success:
        raise DataValidationError(report)
    return report
