"""Per-image test scores of a model version, stored in its MLflow run and keyed by data version.

The paired gate compares challenger and champion image by image, so both need scores on the same
test images. Each version's run keeps `test_scores/<data version>.csv` (columns `path`, `label`,
`score`): the challenger's is written at promotion, the champion's the first time it is re-scored
on a new data version, so a champion is re-scored at most once per data version.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from data_layer.manifest import GROUP, LABEL, PATH, read_manifest, resolve_path, select
from data_layer.pixels import ImageReadError
from tasks.registry.mlflow_model import SCORE, load_dpa_scorer
from tasks.serving.scoring import ERROR, iter_scores
from tasks.training.evaluation import ModelEvaluation
from tasks.training.metrics import binary_labels

SCORES_DIR = "test_scores"


class ScoredSet(BaseModel):
    """One model's scores on a test set: `paths` identify the images, labels are 1 for abnormal,
    `groups` name each image's patient (empty in scores stored before patients were recorded)."""

    paths: list[str]
    labels: list[int]
    scores: list[float]
    groups: list[str] = []

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({PATH: self.paths, LABEL: self.labels, SCORE: self.scores})
        return frame.assign(**{GROUP: self.groups}) if self.groups else frame

    @classmethod
    def of(cls, evaluation: ModelEvaluation) -> ScoredSet:
        return cls(paths=evaluation.test_paths, labels=evaluation.test_labels, scores=evaluation.test_scores,
                   groups=evaluation.test_groups)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ScoredSet:
        groups = frame[GROUP].astype(str).tolist() if GROUP in frame else []
        return cls(paths=frame[PATH].astype(str).tolist(), labels=frame[LABEL].astype(int).tolist(),
                   scores=frame[SCORE].astype(float).tolist(), groups=groups)


def scores_artifact_path(data_version: str) -> str:
    """`test_scores/<data version>.csv`, the data version made file-name safe."""
    return f"{SCORES_DIR}/{re.sub(r'[^A-Za-z0-9_.-]', '_', data_version)}.csv"


def log_scores(client: MlflowClient, run_id: str, data_version: str, scored: ScoredSet) -> None:
    path = Path(scores_artifact_path(data_version))
    with tempfile.TemporaryDirectory() as tmp:
        scored.frame().to_csv(Path(tmp) / path.name, index=False)
        client.log_artifact(run_id, str(Path(tmp) / path.name), path.parent.as_posix())


def load_scores(client: MlflowClient, run_id: str | None, data_version: str) -> ScoredSet | None:
    """The stored scores of a run on this data version, or None when there are none (or no run)."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, scores_artifact_path(data_version), tmp)
        except (MlflowException, OSError):
            return None
        return ScoredSet.from_frame(pd.read_csv(local, dtype={PATH: str, GROUP: str}, keep_default_na=False))


def aligned(challenger: ScoredSet, champion: ScoredSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and both score vectors in the challenger's image order; a different image set is an error."""
    theirs = champion.frame().set_index(PATH)
    if len(theirs) != len(challenger.paths) or set(theirs.index) != set(challenger.paths):
        raise ValueError(
            f"the champion's test scores cover {len(theirs)} images, the challenger's {len(challenger.paths)}, "
            "and the paths differ: they were not scored on the same test split. Delete the stale "
            f"{SCORES_DIR}/ artifact of the champion's run to have it re-scored."
        )
    theirs = theirs.loc[challenger.paths]
    if (theirs[LABEL].to_numpy() != np.asarray(challenger.labels)).any():
        raise ValueError("the champion's stored test labels differ from the challenger's for the same paths")
    return np.asarray(challenger.labels), np.asarray(challenger.scores), theirs[SCORE].to_numpy(dtype=float)


def scorer_on_test_split(dataset_dir: str | Path) -> Callable[[str], ScoredSet]:
    """`score(model_uri) -> ScoredSet` on a dataset's test split, read from its files, so a champion
    with another preprocessing config is scored exactly as it would serve."""
    test = select(read_manifest(dataset_dir), split="test")
    files = [resolve_path(dataset_dir, p) for p in test[PATH]]

    def score(model_uri: str) -> ScoredSet:
        frames = pd.concat(iter_scores(load_dpa_scorer(model_uri), files, heatmaps=False))
        failed = frames[frames[ERROR] != ""]
        if len(failed):
            raise ImageReadError(f"re-scoring {model_uri} failed on {len(failed)} test file(s): {'; '.join(failed[ERROR][:5])}")
        return ScoredSet(paths=test[PATH].astype(str).tolist(), labels=binary_labels(test[LABEL]).tolist(),
                         scores=frames[SCORE].astype(float).tolist(), groups=test[GROUP].astype(str).tolist())

    return score

