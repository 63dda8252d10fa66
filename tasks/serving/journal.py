"""The append-only journal that makes batch scoring crash-safe and resumable.

Scored rows are appended chunk by chunk to `<out>/scores.journal.csv`, each append flushed and
fsynced, so a crash (even SIGKILL or a power cut) loses at most the chunk being scored. A rerun
with the same model version and output folder reads the journal back, drops a partially written
last line, and skips every input whose (path, sha256 of its content) is already there: an
unchanged file is never scored or written twice, an edited one is scored again. One model
version and one threshold per output folder: a journal of another version, or whose `is_anomaly`
decisions were taken at another threshold (`--threshold`/`--specificity`), is refused, never
mixed. One scoring process per output folder at a time (a file lock).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from filelock import FileLock, Timeout

from tasks.registry.model_uri import PREFIX, registered_version

JOURNAL_CSV = "scores.journal.csv"
LOCK_FILE = ".scoring.lock"
MODEL_URI, MODEL_VERSION, INPUT_DIGEST, THRESHOLD = "model_uri", "model_version", "input_digest", "threshold"
KEY = ("path", INPUT_DIGEST)

log = logging.getLogger(__name__)


class ScoringStateError(RuntimeError):
    """The output folder holds scores this run must not mix with (another model, other columns)."""


@dataclass(frozen=True)
class ModelRef:
    """A model pinned to one immutable version: `uri` loads exactly it, `version` names it in each row."""

    uri: str
    version: str


def resolve_model(model_uri: str) -> ModelRef:
    """`models:/name@alias` and `models:/name/N` become `models:/name/<version>`; any other URI
    (runs:/, a logged-model id, a path) is named by its logged model's uuid. Resolving once, before
    loading, means an alias that moves during a run cannot mix two models' scores."""
    rest = model_uri.removeprefix(PREFIX)
    if rest != model_uri and ("@" in rest or "/" in rest):
        found = registered_version(model_uri)
        return ModelRef(f"models:/{found.name}/{found.version}", str(found.version))
    return ModelRef(model_uri, mlflow.models.get_model_info(model_uri).model_uuid)


def row_keys(frame: pd.DataFrame) -> pd.Series:
    """One string per row naming its (path, input digest): what makes a file already scored."""
    return frame[KEY[0]].astype(str) + "\0" + frame[INPUT_DIGEST].astype(str)


def file_digests(files: list[Path]) -> list[str]:
    """sha256 of each file's bytes ('' for a file that cannot be read: it is scored as an error row)."""

    def digest(file: Path) -> str:
        try:
            with open(file, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            return ""

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(digest, files))


class ScoreJournal:
    """`<out>/scores.journal.csv`: the header, then one line per scored file, in scoring order.
    `threshold` is the one this run applies, as written in the rows' `threshold` column. A journal
    begun before one of the `optional` columns existed goes on without it (`columns` then drops it),
    so an upgrade never refuses to resume or extend a folder."""

    def __init__(self, out_dir: Path, columns: list[str], model: ModelRef, threshold: str, optional: frozenset[str] = frozenset()):
        self.file = out_dir / JOURNAL_CSV
        self.columns, self.model, self.threshold, self.optional = columns, model, threshold, optional

    def read(self) -> pd.DataFrame:
        """The rows already scored (empty when new), after dropping a torn last line and checking
        that the journal belongs to this model version and these columns."""
        if self.file.is_file():
            self._drop_torn_tail()
        if not self.file.is_file() or self.file.stat().st_size == 0:
            self._write(",".join(self.columns) + "\n")
            return pd.DataFrame(columns=self.columns)
        rows = pd.read_csv(self.file, dtype=str, keep_default_na=False)
        if list(rows.columns) == [c for c in self.columns if c not in self.optional]:
            self.columns = list(rows.columns)
        if list(rows.columns) != self.columns:
            raise ScoringStateError(
                f"{self.file} was written with other columns ({', '.join(rows.columns)}), e.g. with heat maps "
                "switched on or off, another input kind, or before scores recorded their threshold: rerun with the "
                "same options, or choose another --out."
            )
        versions = sorted(set(rows[MODEL_VERSION]) - {self.model.version})
        if versions:
            uri = rows.loc[rows[MODEL_VERSION] == versions[0], MODEL_URI].iloc[0]
            raise ScoringStateError(
                f"{self.file.parent} holds scores of model version {', '.join(versions)} ({uri}); this run scores "
                f"with version {self.model.version} ({self.model.uri}). Scores of two versions are never mixed: "
                "choose another --out, or delete that folder to score it again."
            )
        thresholds = sorted(set(rows[THRESHOLD]) - {self.threshold})
        if thresholds:
            raise ScoringStateError(
                f"{self.file.parent} holds decisions (is_anomaly) taken at threshold {', '.join(thresholds)}; this run "
                f"applies threshold {self.threshold}. Decisions at two thresholds are never mixed: rerun with the same "
                "--threshold/--specificity as before (or neither, for the registered one), or choose another --out."
            )
        return rows.drop_duplicates(list(KEY), keep="first")

    def append(self, rows: pd.DataFrame) -> None:
        """Append rows durably (one write, then flush and fsync) before the run moves on."""
        buffer = io.StringIO()
        rows[self.columns].replace({r"[\r\n]+": " "}, regex=True).to_csv(buffer, header=False, index=False, lineterminator="\n")
        self._write(buffer.getvalue())

    def _write(self, text: str) -> None:
        with open(self.file, "a", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def _drop_torn_tail(self) -> None:
        """A crash mid-append leaves a last line without its newline: cut it off (it is scored again)."""
        data = self.file.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a partially written last line (%d bytes) left by an interrupted run", self.file, len(data) - keep)
        with open(self.file, "r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Held for a whole scoring run and released when it ends (acquired once, released once); a
    second run on the same folder is refused, not interleaved."""
    lock = FileLock(out_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ScoringStateError(
            f"another scoring run is writing to {out_dir} (lock {out_dir / LOCK_FILE}); wait for it, or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()
