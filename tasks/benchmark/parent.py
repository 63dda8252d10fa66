"""The benchmark's parent MLflow run: the one its output folder names when this tracking store has
it (a rerun resumes into it), else a new one; cells are its child runs. Used by flows/benchmark.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.registry.tracking import configure_tracking, ensure_experiment, git_commit

PARENT_STATE = "parent_run.json"


@contextmanager
def parent_run(out_dir: Path, experiment: str, presets: list[str], seeds: int) -> Iterator[tuple[str, str]]:
    """(experiment id, run id) of the benchmark's parent run: the out dir's, when this tracking store
    has it, else a new one. Child runs a killed benchmark left RUNNING are marked KILLED."""
    configure_tracking()
    client, state = MlflowClient(), out_dir / PARENT_STATE
    run_id = json.loads(state.read_text())["run_id"] if state.is_file() else None
    if run_id is not None and not _in_store(client, run_id):
        print(f"parent run {run_id} of {out_dir} is not in this tracking store: starting a new one")
        run_id = None
    experiment_id = None if run_id else ensure_experiment(experiment)
    name = None if run_id else f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=name) as run:
        out_dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"run_id": run.info.run_id}))
        mlflow.set_tags({"git_commit": git_commit(), "benchmark.out_dir": str(out_dir), "benchmark.presets": ", ".join(presets),
                         "benchmark.seeds": str(seeds)})
        stale = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'")
        for child in stale:
            client.set_terminated(child.info.run_id, "KILLED")
        yield run.info.experiment_id, run.info.run_id


def _in_store(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
