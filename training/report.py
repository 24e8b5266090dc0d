"""PNG figures of an evaluation: ROC curves, score histograms, best and worst cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.colors import Normalize

from service.runtime import Scorer
from service.scoring import SCORE_NAMES
from training.evaluate import Evaluation
from training.metrics import auroc, roc_curve

SCORES = (*SCORE_NAMES, "combined")
CASES_PER_GROUP = 3


def write_report(out_dir: Path, scorer: Scorer, evaluation: Evaluation) -> list[Path]:
    """Write ``roc.png``, ``histograms.png`` and ``cases.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [
        _roc(out_dir / "roc.png", evaluation),
        _histograms(out_dir / "histograms.png", evaluation),
        _cases(out_dir / "cases.png", scorer, evaluation),
    ]
    plt.close("all")
    return files


def _roc(path: Path, ev: Evaluation) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    labels = ev.test.labels
    for name in SCORES:
        fpr, tpr = roc_curve(ev.scores[name], labels)
        ax.plot(
            fpr,
            tpr,
            label=f"{name} (AUROC {auroc(ev.scores[name], labels):.3f})",
            linewidth=2.5 if name == "combined" else 1.2,
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _histograms(path: Path, ev: Evaluation) -> Path:
    columns = -(-len(SCORES) // 2)
    fig, axes = plt.subplots(2, columns, figsize=(4.7 * columns, 7), squeeze=False)
    labels = ev.test.labels
    for ax in axes.ravel()[len(SCORES) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), SCORES, strict=False):
        values = ev.scores[name]
        shown = values if name == "combined" else np.log10(np.maximum(values, 1e-12))
        bins = np.linspace(float(shown.min()), float(shown.max()), 30)
        ax.hist(shown[~labels], bins=bins, alpha=0.6, label=f"normal ({(~labels).sum()})")
        ax.hist(shown[labels], bins=bins, alpha=0.6, label=f"anomalous ({labels.sum()})")
        if name == "combined":
            ax.axvline(ev.threshold, color="black", linestyle="--", label="threshold")
        ax.set(title=name, xlabel=name if name == "combined" else f"log10 {name}", ylabel="images")
        ax.legend(fontsize=8)
    fig.suptitle("Scores of normal and anomalous test images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _pick_cases(ev: Evaluation) -> list[tuple[int, str]]:
    combined = ev.scores["combined"]
    labels = ev.test.labels
    anomalous = np.flatnonzero(labels)[np.argsort(combined[labels])]
    normal = np.flatnonzero(~labels)[np.argsort(combined[~labels])]
    k = CASES_PER_GROUP
    groups = [
        (anomalous[::-1][:k], "best: clearest anomaly"),
        (anomalous[:k], "worst: faintest anomaly"),
        (normal[::-1][:k], "worst: most suspicious normal"),
    ]
    return [(int(i), title) for indices, title in groups for i in indices]


def to_display(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``(C, H, W)`` -> ``(H, W)`` or ``(H, W, 3)`` for imshow."""
    return image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))


def map_norm(maps: npt.NDArray[np.float32]) -> Normalize:
    """One colour scale for a set of anomaly maps (on the combined score's scale, which can be
    negative): from their 1st to their 99.9th percentile."""
    low, high = (float(v) for v in np.percentile(maps, [1.0, 99.9]))
    return Normalize(vmin=low, vmax=high if high > low else low + 1.0)


def _cases(path: Path, scorer: Scorer, ev: Evaluation) -> Path:
    cases = _pick_cases(ev)
    indices = [i for i, _ in cases]
    recon = scorer.run_model(np.ascontiguousarray(ev.test.images[indices])).recon
    norm = map_norm(ev.maps)
    fig, axes = plt.subplots(3, len(cases), figsize=(2.1 * len(cases), 6.8), squeeze=False)
    grey: dict[str, Any] = {"cmap": "gray", "vmin": 0, "vmax": 1}
    for col, (index, title) in enumerate(cases):
        test = ev.test
        axes[0, col].imshow(to_display(test.images[index]), **grey)
        axes[0, col].set_title(
            f"{title}\n{test.kinds[index]}/{test.paths[index].name}\n"
            f"combined {ev.scores['combined'][index]:.2f}"
            f"{' FLAGGED' if ev.is_anomaly[index] else ''}",
            fontsize=7,
        )
        axes[1, col].imshow(to_display(recon[col]), **grey)
        axes[2, col].imshow(ev.maps[index], cmap="inferno", norm=norm)
        mask = test.masks[index]
        if mask is not None and mask.any():
            axes[2, col].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    for row, name in enumerate(("input", "reconstruction", "anomaly map")):
        axes[row, 0].set_ylabel(name)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Best and worst cases (cyan: ground-truth defect outline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
