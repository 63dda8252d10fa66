"""`dpa data …`: create, import, version, promote and validate datasets (data_layer, tasks.training.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli_options import OverrideOpt, parse_overrides

data_app = typer.Typer(help="Create, import, promote and validate datasets.", no_args_is_help=True)


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="output dataset directory")],
    overrides: OverrideOpt = None,
) -> None:
    """Generate synthetic chest X-ray phantoms (PhantomSpec fields via --set, e.g. -s n_train_normal=500)."""
    from data_layer.phantoms import PhantomSpec, generate_phantoms

    typer.echo(f"wrote {generate_phantoms(out, PhantomSpec(**parse_overrides(overrides)))}")


@data_app.command("import")
def data_import(
    kind: Annotated[str, typer.Argument(help="folder | csv | medmnist | cifar10 | svhn | nih | camelyon16")],
    out: Annotated[Path, typer.Option(help="output dataset directory")],
    overrides: OverrideOpt = None,
    workspace: Annotated[Optional[str], typer.Option(
        help="validate, then version it as the project's dataset workspace datasets/<name> (dvc add + push)")] = None,
    promote: Annotated[bool, typer.Option(help="with --workspace: also make it the production dataset data/")] = False,
) -> None:
    """Import a source into the manifest format; importer options via --set (see README)."""
    from data_layer.validation import ensure_valid
    from data_layer.versioning import commit_dataset, dataset_paths, init_repo
    from tasks.config import DataSource
    from tasks.paths import project_dir
    from tasks.training.data import import_to

    if promote and not workspace:
        raise typer.BadParameter("--promote needs --workspace: the version is kept in a workspace, then promoted")
    source = DataSource.model_validate({"importer": kind, **parse_overrides(overrides)})
    dataset = import_to(source, out)
    typer.echo(f"wrote {dataset}")
    if workspace:
        ensure_valid(dataset, report_dir=dataset.parent / f"{dataset.name}-validation")
        init_repo(project_dir())
        version = commit_dataset(project_dir(), dataset, workspace)
        typer.echo(f"data version {version} is now workspace {workspace} ({project_dir() / dataset_paths(workspace)[0]})")
        if promote:
            data_promote(workspace)


@data_app.command("promote")
def data_promote(
    workspace: Annotated[str, typer.Argument(help="the dataset workspace (datasets/<name>) whose current version becomes production")],
) -> None:
    """Make a workspace's current version the production dataset data/ that scheduled retraining reads."""
    from data_layer.versioning import DATA_DIR, DatasetNotFound, data_version, promote_dataset
    from tasks.paths import project_dir

    project = project_dir()
    try:
        before = data_version(project)
    except DatasetNotFound:
        before = "none"
    version = promote_dataset(project, workspace)
    typer.echo(f"production dataset {project / DATA_DIR}: data version {before} → {version} (workspace {workspace}); "
               "commit data.dvc to record it")


@data_app.command("validate")
def data_validate(
    dataset_dir: Annotated[Path, typer.Argument(help="dataset directory with manifest.csv")],
    report_dir: Annotated[Optional[Path], typer.Option(help="write JSON report and Data Docs here")] = None,
    overrides: OverrideOpt = None,
) -> None:
    """Run the Great Expectations gate; exit 1 with a readable report on failure."""
    from data_layer.validation import ValidationRules, validate_dataset

    report = validate_dataset(dataset_dir, ValidationRules(**parse_overrides(overrides)), report_dir)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.success else 1)
