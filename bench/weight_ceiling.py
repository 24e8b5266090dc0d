"""How far any fixed weighing of the score terms could take TPR at the threshold: a ceiling.

    python -m bench.weight_ceiling BUNDLE DATA_DIR [BUNDLE DATA_DIR ...] [--levels 0 0.5 1 2]

Each bundle's held-out good images and test split are scored once (:func:`bench.rule_study.
study_scores`); then every weight vector with each term's weight among ``--levels`` (not all 0)
is fitted on the held-out scores alone, as a fit would (the product's soft maximum, its
threshold for the bundle's false-alarm rate), and scored on the test splits. Printed: the
product's weights, the vectors with the highest mean TPR at the threshold that keep every
dataset's FPR within ``--max-fpr``, and the best vector for each dataset alone.

The vectors are ranked on the test splits, so the figures are an upper bound on what choosing
the weights could give, not a rule a fit could use: a diagnosis, never a way to pick a default.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.rule_study import TERMS, Combiner, RuleRow, StudyScores, rule_row, study_scores
from service.bundle import BundleError
from training.calibrate import DEFAULT_WEIGHTS
from training.errors import DataError

Weights = tuple[float, ...]


@dataclass(frozen=True)
class GridRow:
    """One weight vector (in the order of ``TERMS``) and its row on each dataset."""

    weights: Weights
    rows: tuple[RuleRow, ...]

    @property
    def mean_tpr(self) -> float:
        """Mean TPR at the threshold over the datasets."""
        return float(np.mean([row.tpr for row in self.rows]))

    @property
    def mean_auroc(self) -> float:
        """Mean image AUROC over the datasets."""
        return float(np.mean([row.auroc for row in self.rows]))

    def within(self, max_fpr: float) -> bool:
        """Whether every dataset's FPR at the threshold is at most ``max_fpr``."""
        return all(row.fpr <= max_fpr for row in self.rows)


def weight_grid(levels: Sequence[float]) -> list[Weights]:
    """Every vector of ``len(TERMS)`` weights drawn from ``levels``, all-zero left out."""
    return [w for w in itertools.product(levels, repeat=len(TERMS)) if any(w)]


def scan(scores: Sequence[StudyScores], levels: Sequence[float]) -> list[GridRow]:
    """Each vector of :func:`weight_grid`, fitted and scored on every dataset."""
    rows = []
    for weights in weight_grid(levels):
        combiner = Combiner(dict(zip(TERMS, weights, strict=True)))
        rows.append(GridRow(weights, tuple(rule_row(s, "grid", combiner) for s in scores)))
    return rows


def default_weights() -> Weights:
    """The product's weights in the order of ``TERMS``."""
    return tuple(float(DEFAULT_WEIGHTS[t]) for t in TERMS)


def _pairs(paths: Sequence[Path], parser: argparse.ArgumentParser) -> list[tuple[Path, Path]]:
    if not paths or len(paths) % 2:
        parser.error("give bundles and their data folders in pairs: BUNDLE DATA_DIR ...")
    return list(zip(paths[::2], paths[1::2], strict=True))


def _describe(grid_row: GridRow, names: Sequence[str]) -> str:
    cells = "  ".join(
        f"{name} {row.auroc:.3f}/{row.tpr:.3f}/{row.fpr:.3f}"
        for name, row in zip(names, grid_row.rows, strict=True)
    )
    weights = ",".join(f"{w:g}" for w in grid_row.weights)
    return f"({weights})  {cells}  mean AUROC {grid_row.mean_auroc:.3f} TPR {grid_row.mean_tpr:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("paths", type=Path, nargs="+", metavar="BUNDLE DATA_DIR")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--max-fpr", type=float, default=0.03, help="most FPR on any dataset")
    parser.add_argument("--top", type=int, default=5, help="how many common vectors to print")
    args = parser.parse_args(argv)
    pairs = _pairs(args.paths, parser)
    if any(level < 0 for level in args.levels) or not any(args.levels):
        parser.error(f"--levels must be >= 0 with one above 0, got {args.levels}")
    try:
        scores = [study_scores(bundle, data) for bundle, data in pairs]
    except (BundleError, DataError) as exc:
        parser.exit(2, f"weight_ceiling: {exc}\n")
    names = [data.resolve().name for _, data in pairs]
    grid = scan(scores, sorted(set(args.levels) | set(default_weights())))
    print(f"terms in order: {', '.join(TERMS)}; per dataset AUROC/TPR/FPR at the threshold")
    by_weights = {row.weights: row for row in grid}
    print("product's weights   " + _describe(by_weights[default_weights()], names))
    allowed = sorted((r for r in grid if r.within(args.max_fpr)), key=lambda r: -r.mean_tpr)
    print(f"best common weights (every FPR <= {args.max_fpr:g}), of {len(grid)} vectors:")
    for common in allowed[: args.top]:
        print("  " + _describe(common, names))
    alone = []  # each dataset's best TPR within the FPR allowed (0 where no vector keeps it)
    for i, name in enumerate(names):
        fitting = [r for r in grid if r.rows[i].fpr <= args.max_fpr]
        if not fitting:
            alone.append(0.0)
            print(f"best for {name} alone: no vector keeps its FPR within {args.max_fpr:g}")
            continue
        best = max(fitting, key=lambda r: r.rows[i].tpr)
        row = best.rows[i]
        alone.append(row.tpr)
        weights = ",".join(f"{w:g}" for w in best.weights)
        print(
            f"best for {name} alone: ({weights}) "
            f"AUROC {row.auroc:.3f} TPR {row.tpr:.3f} FPR {row.fpr:.3f}"
        )
    print(f"mean of each dataset's own best TPR: {float(np.mean(alone)):.3f}")


if __name__ == "__main__":
    main()
