"""The benchmark's one table, built from the finished cells' records: per preset the DPA's mean ±
std test AUROC over seeds (and each seed's), the pixel baselines', the published figure where one
can be sourced, training images/s and wall time. Written as CSV (numbers) and Markdown (for
reading), logged on the parent MLflow run and published as a Prefect artifact.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import mlflow
import pandas as pd
from prefect.artifacts import create_markdown_artifact

from tasks.benchmark.cells import CellRecord
from tasks.config import RunConfig
from tasks.training.seeds import seed_spread

CSV_NAME, MARKDOWN_NAME = "benchmark.csv", "benchmark.md"


def benchmark_table(configs: list[RunConfig], records: dict[str, list[CellRecord]], seeds: int) -> pd.DataFrame:
    """One row per preset; a preset with no finished cell keeps its row, with empty figures."""
    baselines = list(dict.fromkeys(name for done in records.values() for r in done for name in r.baselines))
    rows = []
    for cfg in configs:
        done = sorted(records.get(cfg.preset, []), key=lambda r: r.seed)
        spread = seed_spread({r.seed: r.test_auroc for r in done}) if done else {"mean": None, "std": None}
        rows.append({
            "preset": cfg.preset, "seeds_done": len(done), "seeds": seeds,
            "test_auroc_mean": spread["mean"], "test_auroc_std": spread["std"],
            "test_auroc_per_seed": "; ".join(f"{r.seed}: {r.test_auroc:.4f}" for r in done),
            **{f"baseline_{name}_auroc": _mean([r.baselines[name] for r in done if name in r.baselines]) for name in baselines},
            "paper_test_auroc": cfg.paper.test_auroc if cfg.paper else None,
            "paper_source": cfg.paper.source if cfg.paper else "",
            "train_images_per_s": _mean([r.train_images_per_s for r in done]),
            "wall_seconds": sum(r.wall_seconds for r in done),
            "vgg_weights": ", ".join(sorted({r.vgg_weights for r in done})),
        })
    return pd.DataFrame(rows)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _figure(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def markdown(table: pd.DataFrame, title: str) -> str:
    """The table for reading: figures rounded, published figures numbered with their sources below."""
    sources = [s for s in table["paper_source"] if s]
    baselines = [c for c in table.columns if c.startswith("baseline_")]
    view = pd.DataFrame({
        "preset": table["preset"],
        "seeds": [f"{d}/{n}" for d, n in zip(table["seeds_done"], table["seeds"])],
        "DPA test AUROC (mean ± std)": [
            "—" if pd.isna(m) else f"{m:.3f} ± {s:.3f}" for m, s in zip(table["test_auroc_mean"], table["test_auroc_std"])
        ],
        "per seed": table["test_auroc_per_seed"],
        **{c.removeprefix("baseline_").removesuffix("_auroc"): table[c].map(_figure) for c in baselines},
        "paper": [
            f"{_figure(p)} [{sources.index(s) + 1}]" if s else "—" for p, s in zip(table["paper_test_auroc"], table["paper_source"])
        ],
        "train images/s": table["train_images_per_s"].map(lambda v: _figure(v, 1)),
        "wall time (s)": table["wall_seconds"].map(lambda v: _figure(v, 0)),
    })
    notes = "\n".join(f"[{i}] {source}" for i, source in enumerate(sources, 1))
    return f"# {title}\n\n{view.to_markdown(index=False)}\n" + (f"\nPublished figures:\n\n{notes}\n" if notes else "")


def write_table(table: pd.DataFrame, out_dir: Path, title: str) -> tuple[Path, Path]:
    """benchmark.csv and benchmark.md in the out dir; the Markdown is also a Prefect artifact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MARKDOWN_NAME
    table.to_csv(csv_path, index=False)
    text = markdown(table, title)
    md_path.write_text(text)
    create_markdown_artifact(text, key="dpa-benchmark", description="Benchmark table: DPA vs baselines vs the paper")
    return csv_path, md_path


def log_table(table: pd.DataFrame, files: tuple[Path, ...], run_id: str) -> None:
    """The table's files and each preset's mean ± std on the parent run."""
    for file in files:
        mlflow.log_artifact(str(file), run_id=run_id)
    metrics = {f"{row.preset}_test_auroc_{k}": getattr(row, f"test_auroc_{k}")
               for row in table.itertuples() for k in ("mean", "std") if not pd.isna(row.test_auroc_mean)}
    mlflow.log_metrics(metrics, run_id=run_id)
