"""`dpa`: the command line. A thin layer over the flows and the data layer."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli_options import OverrideOpt, parse_overrides
from flows.data_commands import data_app
from model.cpu_malloc import keep_freed_memory

EXIT_USER_ERROR = 2
"""What a mistake of the person running the command exits with (click's own for a bad option too)."""


def user_error(err: BaseException) -> str | None:
    """One line for a person when `err` is theirs to fix (a missing input, an unknown model, alias or
    preset, a bad value, data the gate refuses), naming the problem and the fix; None for a bug."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from data_layer.pixels import ImageReadError
    from data_layer.versioning import DatasetNotFound
    from tasks.registry.mlflow_model import LegacyModelError
    from tasks.registry.model_code import ModelCodeMismatch
    from tasks.registry.onnx_export import ExportInputError, ExportParityError
    from tasks.registry.registration import RegistryConflict
    from tasks.serving.journal import ScoringStateError
    from tasks.serving.scoring import NothingScored

    if isinstance(err, MlflowException) and err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        return (f"{err.message.splitlines()[0]}. Name a registered model as models:/<name>@<alias> or models:/<name>/<version>, "
                "or a preset with --preset; `mlflow ui` lists the registered models")
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
    if type(err).__name__ == "DataValidationError" or isinstance(
        err, (DatasetNotFound, ExportInputError, ExportParityError, FileNotFoundError, ImageReadError, LegacyModelError,
              ModelCodeMismatch, NothingScored, RegistryConflict, ScoringStateError)
    ):
        return str(err).splitlines()[0]
    return None


class _App(typer.Typer):
    """`dpa`: a user error prints one line and exits 2; with --debug, or for anything else, the traceback."""

    debug = False

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - typer's own signature
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:
            message = None if _App.debug else user_error(err)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise SystemExit(EXIT_USER_ERROR) from None


app = _App(help="Deep Perceptual Autoencoder pipeline for anomaly detection in medical images.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def _before_any_command(
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of a user error too")] = False,
) -> None:
    """Set up malloc while this is the only thread, so the task threads that train share its setting;
    give Prefect's temporary server (a command run without PREFECT_API_URL) time to start: its 20 s
    default is too short for the first start of a fresh install on 2 cores (seen in `make demo`);
    and keep that server's telemetry off unless asked for, as `dpa up` does: it would call Prefect's
    servers from a hospital's network, and on a first start it raced the database migration
    ("database is locked", a traceback in `make demo`'s output)."""
    _App.debug = debug
    keep_freed_memory()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def exit_code_on_signal() -> Iterator[None]:
    """A stop on SIGINT/SIGTERM exits 130/143 (128 + the signal), as shells and supervisors expect.
    Long work inside saves its state first (see tasks.runtime.interrupt)."""
    from prefect.exceptions import TerminationSignal

    from tasks.runtime.interrupt import stop_now

    previous = signal.signal(signal.SIGTERM, stop_now)
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("interrupted (SIGINT); rerun the same command to resume", err=True)
        raise typer.Exit(128 + signal.SIGINT) from None
    except TerminationSignal as exc:
        typer.echo(f"stopped by {signal.Signals(exc.signal).name}; rerun the same command to resume", err=True)
        raise typer.Exit(128 + exc.signal) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _params(preset: str, overrides: list[str] | None, dataset: str | None, model_name: str | None):
    from tasks.config import DataSource, PipelineParams

    source = DataSource.model_validate(json.loads(dataset)) if dataset else None
    return PipelineParams(preset=preset, overrides=parse_overrides(overrides), dataset=source, model_name=model_name)


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="a preset in configs/")] = "demo",
    overrides: OverrideOpt = None,
    dataset: Annotated[Optional[str], typer.Option(help='data source as JSON, e.g. \'{"importer": "dvc"}\'')] = None,
    model_name: Annotated[Optional[str], typer.Option(help="registered model name")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="train N seeds in parallel, report mean ± std (dpa.train.seeds)")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        "--nproc-per-node", help="train on N processes (one per GPU) with DDP through torchrun (dpa.train.nproc_per_node)")] = None,
) -> None:
    """Run the training pipeline: data → validate → preprocess → train → evaluate → register → promote."""
    from flows.training import training_pipeline
    from tasks.training.summary import baseline_line

    flags = {"seeds": seeds, "nproc_per_node": nproc_per_node}
    overrides = [*(overrides or []), *(f"dpa.train.{key}={value}" for key, value in flags.items() if value)]
    with exit_code_on_signal():
        summary = training_pipeline(_params(preset, overrides, dataset, model_name))
    typer.echo(json.dumps(summary, indent=2, default=str))
    typer.echo(baseline_line(summary))


DEMO_WEIGHTS_NOTE = (
    "Offline the demo's VGG19 has random weights, which are not the paper's perceptual space; "
    "README 'Demo vs baselines' shows how to run it with ImageNet weights.\n"
)


@app.command()
def demo() -> None:
    """The main job on the embedded default: synthetic phantoms, offline, on CPU, a few minutes."""
    from flows.training import training_pipeline
    from tasks.paths import project_dir
    from tasks.registry.tracking import tracking_uri
    from tasks.training.summary import baseline_line

    # The demo's phantoms are its production data: promoted explicitly, so scheduled retraining finds them.
    s = training_pipeline(_params("demo", ["dataset.promote=true"], None, None))
    typer.echo(
        f"\nTest AUROC {s['auroc']:.3f} (95% CI {s['auroc_ci'][0]:.3f}–{s['auroc_ci'][1]:.3f}, {s['auroc_ci_method']}) "
        f"on data version {s['data_version']}\n"
        f"{baseline_line(s)}\n{DEMO_WEIGHTS_NOTE if s['baseline_warning'] else ''}"
        f"Registered {s['model_name']} version {s['version']} with alias 'challenger'"
        f"{' and promoted to champion' if s['promoted'] else ''}.\n"
        f"Promotion decision: {s['decision']}\n\n"
        f"Browse the runs:   .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}\n"
        f"Browse the flows:  .venv/bin/prefect server start   (then open http://127.0.0.1:4200)\n"
        f"Score new images (fresh phantoms of new patients, normal ones, so no drift is expected):\n"
        f"  .venv/bin/dpa data phantoms --out new_phantoms -s seed=101 -s n_train_normal=0 -s n_val_normal=0 "
        f"-s n_test_normal=60 -s n_val_abnormal=0 -s n_test_abnormal=0\n"
        f"  .venv/bin/dpa score --model models:/{s['model_name']}@champion --input new_phantoms --out scores/\n"
        f"(The demo's dataset, {project_dir() / 'data'}, holds its labelled test anomalies: scored as new images, "
        "they rightly report drift.)"
    )


@app.command()
def tune(
    val_anomaly_type: Annotated[str, typer.Option(help="anomaly_type of the few validation anomalies (train/val only)")],
    preset: Annotated[str, typer.Option(help="base preset in configs/")] = "demo",
    overrides: OverrideOpt = None,
    n_anomalies: Annotated[int, typer.Option(help="at most this many validation anomalies")] = 50,
    folds: Annotated[int, typer.Option(help="cross-validation folds, grouped by patient")] = 3,
    search_space: Annotated[str, typer.Option(help="configs/search_spaces/<name>.yaml or a path")] = "ladder",
    search_set: Annotated[Optional[list[str]], typer.Option(help="override the search space: key=YAML value")] = None,
    sampler: Annotated[str, typer.Option(help="grid (the paper's practice) or tpe")] = "grid",
    n_trials: Annotated[Optional[int], typer.Option(help="complete trials wanted (default: the whole grid)")] = None,
    study: Annotated[Optional[str], typer.Option(help="study name; rerun with the same name to resume")] = None,
    study_storage: Annotated[Optional[str], typer.Option(help="study database URL")] = None,
    runner: Annotated[Optional[str], typer.Option(help="threads | processes | dask | ray (default: dask with a cluster address, else threads)")] = None,
    workers: Annotated[int, typer.Option(help="trials running at the same time")] = 2,
    cluster_address: Annotated[Optional[str], typer.Option(help="Dask scheduler, e.g. tcp://host:8786 (default: $DPA_DASK_ADDRESS), or Ray address")] = None,
    seed: int = 0,
    train_best: Annotated[bool, typer.Option(help="then train, register and gate the best configuration")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="data source as JSON")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="registered model name for --train-best")] = None,
) -> None:
    """The paper's few-anomaly hyperparameter search (cross-validated, parallel, resumable)."""
    from flows.tuning import TuningParams, tuning_pipeline

    base = _params(preset, overrides, dataset, model_name)
    params = TuningParams(
        **base.model_dump(), val_anomaly_type=val_anomaly_type, n_anomalies=n_anomalies, folds=folds,
        search_space=search_space, search_overrides=parse_overrides(search_set), sampler=sampler, n_trials=n_trials,
        study_name=study, study_storage=study_storage, task_runner=runner, max_workers=workers,
        cluster_address=cluster_address, seed=seed, train_best=train_best,
    )
    with exit_code_on_signal():
        summary = tuning_pipeline(params)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def benchmark(
    preset: Annotated[list[str], typer.Option(help="preset name or glob, quoted ('cifar10_class*'), or preset .yaml path(s); repeatable")],
    seeds: Annotated[int, typer.Option(min=1, help="training seeds per preset")] = 3,
    overrides: OverrideOpt = None,
    dataset_root: Annotated[Optional[Path], typer.Option(help="local download for the CIFAR10/SVHN/NIH/Camelyon16 importers (dataset.root)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="cell records and the table; rerun with the same to resume [default: outputs/benchmark]")] = None,
    cluster_address: Annotated[Optional[str], typer.Option(help="Dask scheduler, e.g. tcp://host:8786 (default: $DPA_DASK_ADDRESS)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="cells at once on this machine (without a cluster)")] = 2,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the parent run")] = "dpa-benchmark",
) -> None:
    """Presets × seeds as parallel cells (resumable), summarised in one table beside the baselines and the paper."""
    from flows.benchmark import BenchmarkParams, benchmark_pipeline

    params = BenchmarkParams(
        presets=preset, seeds=seeds, overrides=parse_overrides(overrides), dataset_root=str(dataset_root) if dataset_root else None,
        out_dir=str(out) if out else None, cluster_address=cluster_address, max_workers=workers, experiment=experiment,
    )
    with exit_code_on_signal():
        summary = benchmark_pipeline(params)
    typer.echo(f"wrote {summary['csv']} and {summary['markdown']} ({summary['ran']} cells run, {summary['skipped']} already done; "
               f"MLflow parent run {summary['parent_run_id']})")


@app.command()
def score(
    model: Annotated[Optional[str], typer.Option(help="MLflow model URI; default: the champion of --preset's registered model")] = None,
    preset: Annotated[str, typer.Option(help="the preset whose registered model scores, when --model is not given")] = "demo",
    input: Annotated[Path, typer.Option("--input", help="folder of images, dataset dir with manifest.csv, or DICOM dir")] = ...,
    out: Annotated[Path, typer.Option(help="output directory for scores.csv and heat maps")] = Path("scores"),
    heatmaps: Annotated[bool, typer.Option(help="write heat-map PNGs")] = True,
    chunk_size: Annotated[int, typer.Option(min=1, help="images scored (and saved) together")] = 64,
    threshold: Annotated[Optional[float], typer.Option(min=0.0, help="anomaly if score > this (instead of the registered threshold)")] = None,
    specificity: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="threshold = this quantile of the version's normal reference scores, e.g. 0.99")] = None,
    monitor: Annotated[bool, typer.Option(help="check the batch for score drift: MLflow <model>-monitoring run; with PREFECT_API_URL, the dpa.scores.drifted event")] = True,
    drift_alpha: Annotated[Optional[float], typer.Option(help="false-alarm rate of the drift check (default 0.01)")] = None,
    drift_min_batch: Annotated[Optional[int], typer.Option(help="fewer scored images: no drift verdict (default 30)")] = None,
    dicom_out: Annotated[Optional[Path], typer.Option(
        help="also write a DICOM Structured Report and a heat-map Secondary Capture per DICOM input here")] = None,
) -> None:
    """Score images with a registered model (by default the champion). Crash-safe: rerun the same
    command after a crash or a stop to score only what is missing."""
    from pydantic import ValidationError

    from tasks.config import model_name_of
    from tasks.monitoring.drift import DriftLevels
    from tasks.monitoring.monitor import monitor_batch
    from tasks.registry.mlflow_model import champion_uri
    from tasks.registry.tracking import configure_tracking
    from tasks.serving.scoring import score_inputs

    try:
        levels = DriftLevels.model_validate({k: v for k, v in {"alpha": drift_alpha, "min_batch": drift_min_batch}.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    configure_tracking()
    model = model or champion_uri(model_name_of(preset))
    with exit_code_on_signal():
        csv = score_inputs(model, str(input), str(out), heatmaps, chunk_size, threshold=threshold, specificity=specificity,
                           dicom_out=str(dicom_out) if dicom_out else None)
    typer.echo(f"wrote {csv}")
    if monitor:
        typer.echo(monitor_batch(csv, levels, threshold, specificity).note)


class ExportFormat(str, Enum):
    onnx = "onnx"


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="the version to export: models:/NAME@ALIAS or models:/NAME/VERSION")],
    out: Annotated[Path, typer.Option(help="output directory for model.onnx and its sidecar model.json")],
    format: Annotated[ExportFormat, typer.Option("--format", help="export format")] = ExportFormat.onnx,
    heatmaps: Annotated[bool, typer.Option(help="also output the anomaly maps (anomaly_map, N x S x S)")] = False,
    images: Annotated[Optional[Path], typer.Option(
        help="images to check the export on (default: the test split of the data version the model was trained on)")] = None,
) -> None:
    """Export a registered version as an ONNX scoring graph, kept only if ONNX Runtime scores its test
    images as PyTorch does (within 1e-4 relative); logged to the version's run."""
    from tasks.registry.onnx_export import export_version
    from tasks.registry.tracking import configure_tracking

    configure_tracking()
    result = export_version(model, out, heatmaps, images)
    typer.echo(f"wrote {result.onnx_file} and {result.sidecar} ({format.value}); ONNX Runtime vs PyTorch on {result.images} "
               f"images: max relative score difference {result.max_relative_difference:.2g}")


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(help="models:/name@alias, models:/name/version, a run id, or a scores.csv")],
) -> None:
    """Print the chain scores → model version → run → git commit → data version → manifest counts → source."""
    from tasks.registry.lineage import lineage as chain
    from tasks.registry.tracking import configure_tracking

    configure_tracking()
    for line in chain(target):
        typer.echo(line)


@app.command()
def up(
    prefect_port: Annotated[int, typer.Option(help="Prefect server and UI port on 127.0.0.1")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server and UI port on 127.0.0.1")] = 5000,
    prefect_db: Annotated[Optional[str], typer.Option(
        envvar="DPA_PREFECT_DB_URL", help="Prefect database URL, or 'sqlite'; default: the local PostgreSQL if it answers, else SQLite")] = None,
) -> None:
    """Bring up the local stack for UI-triggered runs: Prefect server, MLflow server, work pool, deployments, worker."""
    from tasks.runtime.stack import StackError, describe
    from tasks.runtime.stack import up as start_stack

    try:
        stack = start_stack(prefect_port, mlflow_port, prefect_db)
    except StackError as error:
        typer.echo(f"dpa up: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(describe(stack))


@app.command()
def down() -> None:
    """Stop exactly what `dpa up` started (by its recorded process ids)."""
    from tasks.runtime.stack import down as stop_stack

    stopped = stop_stack()
    typer.echo(f"stopped {', '.join(f'{p.name} ({p.pid})' for p in stopped)}" if stopped else "no stack was running")
