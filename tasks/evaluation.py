"""Evaluation of anomaly scores: metrics with a bootstrap CI, the plots a reviewer looks at, a model card.

The functions are plain (no Prefect server, no MLflow run needed), so tests call them directly; the
`evaluate` task at the bottom is the training flow's evaluation stage and logs them to the run.
Labels are 1/True for abnormal (or the manifest strings `normal`/`abnormal`); higher scores mean
more anomalous, as `model.scoring.score_images` returns them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on workers and CI

import matplotlib.pyplot as plt
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from data_layer.manifest import ABNORMAL, ANOMALY_TYPE, LABELS, PATH
from data_layer.preprocessing import PreprocessedDataset
from model.baselines import DESCRIPTIONS, fit_baselines
from model.dpa import DPA, center_crop
from model.scoring import anomaly_maps, score_images

if TYPE_CHECKING:  # tasks.config imports the GX gate: seconds, only needed by type checkers here
    from tasks.config import RunConfig

FIXED_SPECIFICITY = 0.95
HEATMAP_SAMPLES_PER_CLASS = 4


class Evaluation(BaseModel):
    """Test-set metrics of one model; `auroc_ci_*` is a stratified-bootstrap 95% percentile interval."""

    auroc: float
    auprc: float
    sensitivity_at_95_specificity: float
    auroc_ci_low: float
    auroc_ci_high: float
    n_normal: int
    n_abnormal: int

    def as_mlflow_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """The figures as MLflow metric names (`test_auroc`, ...)."""
        return {f"{prefix}{key}": float(value) for key, value in self.model_dump().items()}


def binary_labels(labels: Sequence | np.ndarray) -> np.ndarray:
    """1 for abnormal, 0 for normal, from bools/0-1 ints or the manifest's label strings."""
    array = np.asarray(labels)
    if array.dtype.kind in "OUS":
        unknown = sorted(set(array.astype(str)) - set(LABELS))
        if unknown:
            raise ValueError(f"labels must be {LABELS}; got {unknown}")
        return (array.astype(str) == ABNORMAL).astype(int)
    if not np.isin(array, (0, 1)).all():
        raise ValueError("numeric labels must be 0 (normal) or 1 (abnormal)")
    return array.astype(int)


def evaluate_scores(
    labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, seed: int = 0, n_bootstrap: int = 1000
) -> Evaluation:
    """AUROC, AUPRC and sensitivity at 95% specificity, with a bootstrap CI on the AUROC.

    The CI resamples normals and abnormals separately (stratified), so every resample keeps the
    test set's class balance and AUROC is always defined.
    """
    y, s = binary_labels(labels), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values: the model diverged or an input is broken")
    n_abnormal = int(y.sum())
    if n_abnormal == 0 or n_abnormal == len(y):
        raise ValueError("AUROC needs both normal and abnormal test images; the test split has only one class")
    low, high = _bootstrap_auroc_ci(s[y == 0], s[y == 1], np.random.default_rng(seed), n_bootstrap)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return Evaluation(
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        sensitivity_at_95_specificity=float(tpr[fpr <= 1.0 - FIXED_SPECIFICITY].max()),
        auroc_ci_low=low,
        auroc_ci_high=high,
        n_normal=len(y) - n_abnormal,
        n_abnormal=n_abnormal,
    )


def _bootstrap_auroc_ci(
    normal: np.ndarray, abnormal: np.ndarray, rng: np.random.Generator, n: int
) -> tuple[float, float]:
    """All resamples at once: AUROC per row from the Mann-Whitney rank sum (ties count one half)."""
    normal_rows = normal[rng.integers(0, len(normal), (n, len(normal)))]
    abnormal_rows = abnormal[rng.integers(0, len(abnormal), (n, len(abnormal)))]
    resampled = np.concatenate([normal_rows, abnormal_rows], axis=1)
    abnormal_ranks = rankdata(resampled, axis=1)[:, len(normal) :].sum(axis=1)
    aurocs = (abnormal_ranks - len(abnormal) * (len(abnormal) + 1) / 2) / (len(normal) * len(abnormal))
    low, high = np.percentile(aurocs, [2.5, 97.5])
    return float(low), float(high)


def baseline_evaluations(data: PreprocessedDataset, crop: int, seed: int = 0) -> dict[str, Evaluation]:
    """Each pixel-space baseline fitted on the training normals only, scored on the test split.

    Images are centre-cropped to `crop` (the DPA's max_res) as the DPA scores them."""
    def view(images: torch.Tensor) -> torch.Tensor:
        return center_crop(images, crop) if images.shape[-1] > crop else images

    fitted = fit_baselines(view(data.subset(split="train", label="normal").images))
    test = data.subset(split="test")
    scores = fitted.score(view(test.images))
    return {name: evaluate_scores(test.labels.numpy(), s, seed=seed) for name, s in scores.items()}


def baseline_warning(dpa_auroc: float, baselines: dict[str, Evaluation]) -> str | None:
    """A plain sentence when the DPA's test AUROC does not beat the best baseline's."""
    if not baselines:
        return None
    name, best = max(baselines.items(), key=lambda item: item[1].auroc)
    if dpa_auroc > best.auroc:
        return None
    return (
        f"WARNING: the DPA (test AUROC {dpa_auroc:.3f}) does not beat the {name} baseline "
        f"({best.auroc:.3f}; {DESCRIPTIONS[name]}). Check the VGG weights (random weights are not the "
        "paper's perceptual space), the feature statistics and the schedule before trusting this model."
    )


def baseline_metrics(baselines: dict[str, Evaluation]) -> dict[str, float]:
    """MLflow metric names `test_baseline_<name>_auroc`, `..._auroc_ci_low`, `..._auroc_ci_high`."""
    return {
        f"test_baseline_{name}_{key}": float(getattr(e, key))
        for name, e in baselines.items()
        for key in ("auroc", "auroc_ci_low", "auroc_ci_high")
    }


def _baseline_section(dpa_auroc: float, baselines: dict[str, Evaluation]) -> str:
    if not baselines:
        return ""
    rows = "\n".join(
        f"| {name}: {DESCRIPTIONS[name]} | {e.auroc:.4f} ({e.auroc_ci_low:.4f}–{e.auroc_ci_high:.4f}) |"
        for name, e in baselines.items()
    )
    warning = baseline_warning(dpa_auroc, baselines)
    return (
        "\n\n## Baselines (same training normals, same test split)\n| detector | test AUROC (95% CI) |\n|---|---|\n"
        f"| DPA (this model) | {dpa_auroc:.4f} |\n{rows}" + (f"\n\n**{warning}**" if warning else "")
    )


log = logging.getLogger(__name__)

VAL_NORMALS = "normal validation images"
TRAIN_NORMALS = "normal training images (the dataset has no normal validation images)"


def operating_threshold(normal_scores: Sequence | np.ndarray, quantile: float) -> float:
    """The served model's alarm threshold: this quantile of the normal validation scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("the threshold needs normal validation images; the val split has none")
    return float(np.quantile(scores, quantile))


def threshold_rule(quantile: float, source: str = VAL_NORMALS) -> str:
    """The threshold rule in words, for the model card and the registered model."""
    caveat = "" if source == VAL_NORMALS else "; the model has seen them, so expect more false alarms on new normals"
    return (
        f"anomaly if score > the {quantile:.3g} quantile of the scores of {source} "
        f"(expected false-alarm rate on normal images ≈ {1 - quantile:.1%}{caveat})"
    )


def evaluation_artifacts(
    evaluation: Evaluation,
    labels: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    images_uint8: torch.Tensor,
    maps_of: Callable[[list[int]], torch.Tensor],
    out_dir: str | Path,
    anomaly_types: Sequence[str] | None = None,
) -> list[Path]:
    """Write the ROC curve, score histograms and a heat-map grid as PNGs into `out_dir`.

    `maps_of(indices)` computes the anomaly maps of just the images the grid shows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, s = binary_labels(labels), np.asarray(scores, dtype=np.float64)
    groups = {"normal": s[y == 0], "abnormal": s[y == 1]}
    paths = [
        _save(_roc_figure(y, s, evaluation), out_dir / "roc_curve.png"),
        _save(_histogram_figure(groups, "Anomaly scores by class"), out_dir / "score_histogram.png"),
    ]
    if anomaly_types is not None:
        types = np.asarray(anomaly_types, dtype=str)
        by_type = {"normal": s[y == 0]} | {t: s[(y == 1) & (types == t)] for t in sorted(set(types[y == 1]))}
        figure = _histogram_figure(by_type, "Anomaly scores by anomaly type")
        paths.append(_save(figure, out_dir / "score_histogram_by_type.png"))
    paths.append(_save(_heatmap_figure(y, s, images_uint8, maps_of), out_dir / "heatmaps.png"))
    return paths


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _roc_figure(y: np.ndarray, s: np.ndarray, evaluation: Evaluation) -> plt.Figure:
    fpr, tpr, _ = roc_curve(y, s)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    label = f"AUROC {evaluation.auroc:.3f} [{evaluation.auroc_ci_low:.3f}, {evaluation.auroc_ci_high:.3f}]"
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.axvline(1 - FIXED_SPECIFICITY, linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return figure


def _histogram_figure(groups: dict[str, np.ndarray], title: str) -> plt.Figure:
    figure, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins=30)
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(values)})")
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend()
    return figure


def _heatmap_figure(
    y: np.ndarray, s: np.ndarray, images: torch.Tensor, maps_of: Callable[[list[int]], torch.Tensor]
) -> plt.Figure:
    """Top-scoring abnormal images (hits) and top-scoring normals (likely false alarms), one shared scale."""
    picks = [(i, label) for label in (1, 0) for i in _top(s, y == label)]
    shown = maps_of([i for i, _ in picks]).float().numpy()
    vmax = float(np.percentile(shown, 99)) if shown.size else 1.0
    figure, axes = plt.subplots(2, max(len(picks), 1), figsize=(2 * max(len(picks), 1), 4.4), squeeze=False)
    for column, (i, label) in enumerate(picks):
        image = center_crop(images[i], shown.shape[-1]).permute(1, 2, 0).numpy()
        image = image.squeeze(-1) if image.shape[-1] == 1 else image
        for row in (0, 1):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[1, column].imshow(shown[column], cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
        axes[0, column].set_title(f"{'abnormal' if label else 'normal'}\nscore {s[i]:.3g}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    figure.suptitle("Highest-scoring test images and their anomaly maps", fontsize=9)
    return figure


def _top(scores: np.ndarray, mask: np.ndarray) -> list[int]:
    indices = np.flatnonzero(mask)
    return indices[np.argsort(-scores[indices], kind="stable")][:HEATMAP_SAMPLES_PER_CLASS].tolist()


def model_card(
    evaluation: Evaluation,
    *,
    model_name: str,
    data_version: str,
    dataset: str,
    threshold: float,
    threshold_rule: str,
    vgg_source: str,
    image_size: int,
    image_channels: int,
    feature_stats: str | None = None,
    baselines: dict[str, Evaluation] | None = None,
) -> str:
    """The Markdown model card logged next to the model: what it is for and what it is not."""
    e = evaluation
    weights_warning = (
        "\n- The perceptual loss uses **random, not ImageNet, VGG19 weights**: scores are not "
        "comparable with the paper's and detection is usually weaker."
        if "random" in vgg_source.lower()
        else ""
    )
    return f"""# Model card: {model_name}

## Intended use
Unsupervised anomaly detection in medical images with a Deep Perceptual Autoencoder (DPA): the
model learned what *normal* images look like and scores how far a new image departs from them
(higher = more anomalous), with a per-pixel anomaly map. For research and for triage experiments
only. **Not a medical device; not for diagnosis or any clinical decision.**

## Data
- dataset: {dataset}
- data version (DVC hash of `data/`): `{data_version}`
- input: {image_channels}-channel images resized to {image_size}×{image_size} by the project's preprocessing
- test set: {e.n_normal} normal, {e.n_abnormal} abnormal images

## Metrics (test split)
| metric | value |
|---|---|
| AUROC | {e.auroc:.4f} (95% CI {e.auroc_ci_low:.4f}–{e.auroc_ci_high:.4f}, stratified bootstrap) |
| AUPRC | {e.auprc:.4f} |
| sensitivity at 95% specificity | {e.sensitivity_at_95_specificity:.4f} |{_baseline_section(e.auroc, baselines or {})}

## Operating threshold
`{threshold:.6g}`: {threshold_rule}. `is_anomaly` in the served output is `anomaly_score > threshold`.

## Method details
- perceptual network: VGG19 features, weights source: {vgg_source}; feature statistics: {feature_stats or "not recorded"}
- anomaly score: relative perceptual L1 reconstruction loss at the final resolution

## Limitations
- Research use only; not validated clinically, not a medical device.
- Trained on normal images of one dataset: scanners, protocols, populations or image types it has
  not seen can raise scores without any pathology (domain shift), and subtle or large diffuse
  anomalies can score low.
- The threshold was set on normal validation images only; its sensitivity is the test figure
  above, not a guarantee.{weights_warning}
"""


class ModelEvaluation(BaseModel):
    """What the evaluation stage hands to registration: the test metrics and the operating threshold."""

    metrics: Evaluation
    threshold: float
    threshold_rule: str
    val_auroc: float | None = None
    baselines: dict[str, Evaluation] = {}

    test_paths: list[str] = []
    test_labels: list[int] = []
    test_scores: list[float] = []
    """Per-image test scores (manifest paths, 1 = abnormal): the paired promotion gate compares them."""
    normal_scores: list[float] = []
    """The scores the threshold was set on: the version's reference distribution (drift, specificity)."""
    normal_source: str = VAL_NORMALS
    threshold_quantile: float = 0.95

    @property
    def baseline_warning(self) -> str | None:
        return baseline_warning(self.metrics.auroc, self.baselines)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(dpa: DPA, data: PreprocessedDataset, cfg: RunConfig, data_version: str, run_id: str) -> ModelEvaluation:
    """Score the test split, set the threshold on the normal validation images (the training
    normals when there are none, said in the rule), and log metrics,
    plots and the model card to the run (explicit `run_id`: the task may run in another thread)."""
    batch, quantile = cfg.dpa.train.score_batch_size, cfg.registry.threshold_quantile
    test, val = data.subset(split="test"), data.subset(split="val")
    test_labels, test_scores = test.labels.numpy(), score_images(dpa, test.images, batch).numpy()
    val_labels, val_scores = val.labels.numpy(), score_images(dpa, val.images, batch).numpy()
    normal_scores, source = val_scores[val_labels == 0], VAL_NORMALS
    if normal_scores.size == 0:  # e.g. the paper's one-vs-rest protocol: every normal image is for training
        log.warning("no normal validation images: the threshold comes from the training normals")
        normal_scores = score_images(dpa, data.subset(split="train", label="normal").images, batch).numpy()
        source = TRAIN_NORMALS
    result = ModelEvaluation(
        metrics=evaluate_scores(test_labels, test_scores, seed=cfg.dpa.train.seed),
        threshold=operating_threshold(normal_scores, quantile),
        threshold_rule=threshold_rule(quantile, source),
        val_auroc=float(roc_auc_score(val_labels, val_scores)) if 0 < val_labels.sum() < len(val_labels) else None,
        baselines=baseline_evaluations(data, dpa.max_res, seed=cfg.dpa.train.seed),
        test_paths=test.manifest[PATH].astype(str).tolist(), test_labels=test_labels.astype(int).tolist(),
        test_scores=test_scores.astype(float).tolist(), normal_scores=normal_scores.astype(float).tolist(),
        normal_source=source, threshold_quantile=quantile,
    )
    if result.baseline_warning:
        log.warning(result.baseline_warning)
    _log_metrics(result, run_id)
    card = model_card(
        result.metrics, model_name=cfg.registry.model_name, data_version=data_version,
        dataset=cfg.description or cfg.dataset.importer, threshold=result.threshold,
        threshold_rule=result.threshold_rule, vgg_source=dpa.vgg_source,
        image_size=cfg.preprocess.size, image_channels=cfg.preprocess.channels,
        feature_stats=dpa.feature_stats, baselines=result.baselines,
    )
    types = test.manifest[ANOMALY_TYPE]
    with tempfile.TemporaryDirectory() as tmp:
        anomaly_types = types.tolist() if (types != "").any() else None

        def maps_of(indices: list[int]) -> torch.Tensor:
            return anomaly_maps(dpa, test.images[indices], batch)

        evaluation_artifacts(result.metrics, test_labels, test_scores, test.images, maps_of, tmp, anomaly_types)
        (Path(tmp) / "model_card.md").write_text(card)
        MlflowClient().log_artifacts(run_id, tmp, "evaluation")
    return result


def _log_metrics(result: ModelEvaluation, run_id: str) -> None:
    figures = result.metrics.as_mlflow_metrics() | {"operating_threshold": result.threshold} | baseline_metrics(result.baselines)
    if result.val_auroc is not None:
        figures["val_auroc"] = result.val_auroc
    now = get_current_time_millis()
    MlflowClient().log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in figures.items()])
