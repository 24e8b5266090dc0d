"""Detection metrics in plain numpy: AUROC, ROC curve, average precision, F1/FPR at a threshold,
the best TPR within a false-alarm budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64Array = npt.NDArray[np.float64]


def _as_pair(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[F64Array, npt.NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if y.all() or not y.any():
        raise ValueError("AUROC needs both positive and negative examples")
    return s, y


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    s, y = _as_pair(scores, labels)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average 1-based ranks over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    n_pos = int(y.sum())
    n_neg = s.size - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[F64Array, F64Array]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = _as_pair(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / max(1, (~y).sum())]
    tpr = np.r_[0.0, tps / max(1, y.sum())]
    return fpr, tpr


def average_precision(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the precision-recall curve, as the mean precision at each positive's rank."""
    s, y = _as_pair(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last_of_run].astype(np.float64)
    predicted = (last_of_run + 1).astype(np.float64)
    recall_gain = np.diff(np.r_[0.0, tps]) / y.sum()
    return float(np.sum(recall_gain * tps / predicted))


def best_tpr_at_fpr(scores: npt.ArrayLike, labels: npt.ArrayLike, max_fpr: float) -> float:
    """The largest share of anomalous images that any one threshold flags while it flags at most
    ``max_fpr`` of the normal images: what the best threshold for this very set could catch,
    which tells whether a verdict is limited by where the threshold stands or by how far the
    scores separate."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr is {max_fpr}; expected a rate in [0, 1]")
    s, y = _as_pair(scores, labels)
    normal = np.sort(s[~y])[::-1]
    # The slack keeps 0.29 * 100 (28.999...) at 29 normal images.
    allowed = math.floor(max_fpr * normal.size + 1e-9)
    if allowed >= normal.size:
        return 1.0
    # Flag what lies above the (allowed + 1)-th highest normal score: at most ``allowed`` normals.
    return float(np.mean(s[y] > normal[allowed]))


@dataclass(frozen=True)
class ThresholdStats:
    """Confusion counts and rates of the verdict ``score >= threshold``."""

    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0 when nothing is detected)."""
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else 0.0

    @property
    def fpr(self) -> float:
        """Share of normal images flagged."""
        negatives = self.false_positives + self.true_negatives
        return self.false_positives / negatives if negatives else 0.0

    @property
    def tpr(self) -> float:
        """Share of anomalous images flagged."""
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else 0.0


def threshold_stats(flagged: npt.ArrayLike, labels: npt.ArrayLike) -> ThresholdStats:
    """Confusion counts of boolean verdicts against boolean labels."""
    f = np.asarray(flagged).astype(bool).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    return ThresholdStats(
        true_positives=int(np.sum(f & y)),
        false_positives=int(np.sum(f & ~y)),
        true_negatives=int(np.sum(~f & ~y)),
        false_negatives=int(np.sum(~f & y)),
    )
