"""Where a scheduled scoring run writes: its own folder per day and model version, under the output root.

`<out>/<YYYY-MM-DD>_<model name>-v<version>/` (the UTC date the run started), holding that run's
scores.csv, journal and heat maps. A promotion needs no edit of the deployment: the new champion's
first run opens a folder of its own instead of colliding with the old version's scores.

The inbox rule: a file is new to a model version when its (path, sha256 of its bytes) pair is in no
earlier folder of that version. So a daily run over an inbox that keeps its files scores each day's
arrivals once, scores an edited file again, and leaves files already scored in the folder where they
were scored; after a promotion, the new version's first folder scores the whole inbox. A rerun on the
same day resumes that day's folder; a run that crossed midnight continues in the next day's folder,
skipping what the earlier one scored. Nothing is moved or deleted in the inbox.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd

from tasks.registry.model_uri import registered_name
from tasks.serving.journal import JOURNAL_CSV, KEY, ModelRef, row_keys


def model_label(model: ModelRef) -> str:
    """`dpa-demo-v3` for a registered version; `model-<uuid prefix>` for a model outside the registry."""
    name = registered_name(model.uri)
    return f"{name}-v{model.version}" if name else f"model-{model.version[:12]}"


def run_folder(root: str | Path, model: ModelRef, day: date) -> Path:
    return Path(root) / f"{day.isoformat()}_{model_label(model)}"


def scored_before(root: str | Path, model: ModelRef, folder: Path) -> frozenset[str]:
    """The (path, digest) keys that earlier folders of the same model version under `root` hold."""
    keys: set[str] = set()
    for journal in sorted(Path(root).glob(f"*_{model_label(model)}/{JOURNAL_CSV}")):
        if journal.parent != folder:
            keys.update(row_keys(pd.read_csv(journal, usecols=list(KEY), dtype=str, keep_default_na=False)))
    return frozenset(keys)
