"""Other ways to weigh and combine a fitted bundle's score terms, scored without refitting.

    python bench/rule_study.py BUNDLE DATA_DIR [--json FILE]

The bundle's graphs score, once each: its held-out good images (the names its manifest lists,
read from ``DATA_DIR``'s training folder), the synthetic defects its fit's rule check makes from
them (:func:`training.synth.synthesised_batches`, the fit's seed and copies) and ``DATA_DIR``'s
test split. Each candidate rule is then fitted on the held-out scores alone, as a fit would fit
it, and printed with its synthetic-defect AUROC (held-out good against synthetic defects, what a
fit could decide on) and, on the test split, its image AUROC and its TPR and FPR at the
threshold for the bundle's false-alarm rate. ``default`` is the product's rule, so its row
reproduces the fit's synthetic AUROC and ``evaluate``'s figures; the others are the candidates
of the "Weighing the terms per fit" entry of docs/quality-history.md, none of them the product's.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.bundle import BundleError
from service.preprocessing import load_image_file, stack
from service.runtime import Scorer, open_scorer
from service.scoring import Calibration, ScoreCalibration, threshold_for_rate
from training.calibrate import (
    CHECK_IMAGES,
    DEFAULT_WEIGHTS,
    SCORING_BATCH,
    SYNTHETIC_COPIES,
    batched_raw_scores,
    joined_scores,
)
from training.data import evenly_spaced, training_folder
from training.errors import DataError
from training.evaluate import load_test_set
from training.metrics import auroc
from training.synth import synthesised_batches

F64Array = npt.NDArray[np.float64]
Raw = Mapping[str, F64Array]
TERMS: tuple[str, ...] = tuple(DEFAULT_WEIGHTS)
# Gaussian quantiles of the tail-scaled candidates: q-th percentile minus median, over z_q.
TAIL_QUANTILES = {"tail-q90": (0.90, 1.2816), "tail-q75": (0.75, 0.6745)}


@dataclass(frozen=True)
class StudyScores:
    """Raw scores of one bundle's held-out good images, its synthetic defects and test split."""

    held_out: Raw
    checked: Raw  # the held-out images the fit's rule check reads
    synthetic: Raw
    test: Raw
    labels: npt.NDArray[np.bool_]
    target_false_alarm_rate: float


def _raw(scorer: Scorer, images: npt.NDArray[np.float32]) -> dict[str, F64Array]:
    return batched_raw_scores(
        images,
        scorer.graphs,
        scorer.calibration.local_window,
        scorer.bundle.latent_reference,
        scorer.bundle.error_reference,
    )


def held_out_images(scorer: Scorer, bundle: Path, data_dir: Path) -> npt.NDArray[np.float32]:
    """The model input of the held-out good images of ``bundle`` (opened as ``scorer``): the
    names its manifest lists, read from ``data_dir``'s training folder."""
    names = scorer.manifest.training.get("data", {}).get("holdout_files")
    if not names:
        raise DataError(f"bundle {bundle} lists no held-out images; it predates the list")
    folder = training_folder(data_dir)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the bundle's {len(names)} held-out images are not in {folder} "
            f"(first: {missing[0]}); was the bundle fitted on {data_dir}?"
        )
    return stack([load_image_file(folder / name, scorer.manifest.input) for name in names])


def study_scores(bundle: Path, data_dir: Path) -> StudyScores:
    """Score the bundle's held-out images, their synthetic defects and the test split."""
    scorer = open_scorer(bundle)
    training = scorer.manifest.training
    spec = scorer.manifest.input
    held_out = held_out_images(scorer, bundle, data_dir)
    rows = evenly_spaced(held_out.shape[0], CHECK_IMAGES)
    checked = held_out[rows]
    synthetic = joined_scores(
        [
            scorer.raw_scores(batch)[0]
            for batch in synthesised_batches(
                checked,
                copies=SYNTHETIC_COPIES,
                seed=int(training["config"]["seed"]),
                batch=SCORING_BATCH,
            )
        ]
    )
    test = load_test_set(data_dir, spec)
    held_out_raw = _raw(scorer, held_out)
    return StudyScores(
        held_out=held_out_raw,
        checked={name: values[rows] for name, values in held_out_raw.items()},
        synthetic=synthetic,
        test=_raw(scorer, test.images),
        labels=test.labels,
        target_false_alarm_rate=scorer.calibration.rule.target_false_alarm_rate,
    )


@dataclass(frozen=True)
class Combiner:
    """Turns held-out raw scores into a combined score: the weights, each term's scale, and
    whether the terms meet in the product's soft maximum or in their mean."""

    weights: Mapping[str, float]
    tail: tuple[float, float] | None = None  # (quantile, its Gaussian z) for tail scaling
    mean: bool = False

    def fit(self, raw: Raw) -> Callable[[Raw], F64Array]:
        """The combined score, its terms standardised on ``raw`` (held-out good images)."""
        calibration = Calibration.fit(
            raw, self.weights, target_false_alarm_rate=0.5, local_window=1
        )
        if self.tail is not None:
            calibration = replace(
                calibration,
                scores={
                    name: _tail_scaled(score, raw[name], *self.tail)
                    for name, score in calibration.scores.items()
                },
            )
        if not self.mean:
            return calibration.combine

        def mean_of_terms(values: Raw) -> F64Array:
            terms = [
                w * calibration.scores[t].standardise(values[t]) for t, w in self.weights.items()
            ]
            return np.asarray(np.mean(terms, axis=0), dtype=np.float64)

        return mean_of_terms


def _tail_scaled(score: ScoreCalibration, values: F64Array, q: float, z: float) -> ScoreCalibration:
    """``score`` with its log scale set from the upper tail: (q-th percentile - median) / z."""
    logs = np.log(np.maximum(values, 1e-12))
    spread = (float(np.quantile(logs, q)) - score.log_centre) / z
    return score if spread <= 0 else replace(score, log_scale=spread)


def synthetic_auroc(scores: StudyScores, combiner: Combiner) -> float:
    """Held-out good images against their synthetic defects, standardised on the former (as the
    fit's rule check does)."""
    combine = combiner.fit(scores.checked)
    normal, defects = combine(scores.checked), combine(scores.synthetic)
    return auroc(np.r_[normal, defects], np.r_[np.zeros(normal.size), np.ones(defects.size)])


def _weights(terms: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(terms, 1.0)


def best_subset(scores: StudyScores) -> dict[str, float]:
    """Of the non-empty subsets of the terms, the best by synthetic AUROC (the most terms within
    0.002 of the best)."""
    found = [
        (synthetic_auroc(scores, Combiner(_weights(s))), len(s), s)
        for r in range(1, len(TERMS) + 1)
        for s in itertools.combinations(TERMS, r)
    ]
    best = max(a for a, _, _ in found)
    return _weights(max((f for f in found if f[0] >= best - 0.002), key=lambda f: (f[1], f[0]))[2])


def backward_elimination(scores: StudyScores) -> dict[str, float]:
    """From all terms, drop the one whose removal raises synthetic AUROC most while that gains
    at least 0.005."""
    kept = list(TERMS)
    current = synthetic_auroc(scores, Combiner(_weights(tuple(kept))))
    while len(kept) > 1:
        trials = [
            (synthetic_auroc(scores, Combiner(_weights(tuple(k for k in kept if k != t)))), t)
            for t in kept
        ]
        gain, dropped = max(trials)
        if gain - current < 0.005:
            break
        kept.remove(dropped)
        current = gain
    return _weights(tuple(kept))


def separation_weights(scores: StudyScores) -> dict[str, float]:
    """Each term weighted by ``max(0, 2 AUROC - 1)`` of its own synthetic AUROC."""
    weights = {t: max(0.0, 2 * synthetic_auroc(scores, Combiner({t: 1.0})) - 1) for t in TERMS}
    return weights if any(weights.values()) else dict(DEFAULT_WEIGHTS)


def _tail_scaled_default(quantile: float, z: float) -> Callable[[StudyScores], Combiner]:
    return lambda _: Combiner(dict(DEFAULT_WEIGHTS), tail=(quantile, z))


# Each candidate rule by name, made from a bundle's scores; "default" is the product's rule.
CANDIDATES: dict[str, Callable[[StudyScores], Combiner]] = {
    "default": lambda _: Combiner(dict(DEFAULT_WEIGHTS)),
    "best-subset": lambda scores: Combiner(best_subset(scores)),
    "backward-elimination": lambda scores: Combiner(backward_elimination(scores)),
    "separation-weights": lambda scores: Combiner(separation_weights(scores)),
    "mean": lambda _: Combiner(dict(DEFAULT_WEIGHTS), mean=True),
    **{name: _tail_scaled_default(*tail) for name, tail in TAIL_QUANTILES.items()},
}


@dataclass(frozen=True)
class RuleRow:
    """One candidate's weights, synthetic AUROC and test-split figures."""

    name: str
    weights: dict[str, float]
    synthetic_auroc: float
    auroc: float
    tpr: float
    fpr: float


def rule_row(scores: StudyScores, name: str, combiner: Combiner) -> RuleRow:
    """The candidate fitted on the held-out images: its synthetic AUROC, and on the test split
    its image AUROC and its TPR and FPR at the threshold for the bundle's false-alarm rate."""
    combine = combiner.fit(scores.held_out)
    rule = threshold_for_rate(np.sort(combine(scores.held_out)), scores.target_false_alarm_rate)
    combined = combine(scores.test)
    flagged, labels = combined >= rule.threshold, scores.labels
    return RuleRow(
        name=name,
        weights=dict(combiner.weights),
        synthetic_auroc=synthetic_auroc(scores, combiner),
        auroc=auroc(combined, labels),
        tpr=float(flagged[labels].mean()),
        fpr=float(flagged[~labels].mean()),
    )


def study(scores: StudyScores) -> list[RuleRow]:
    """Every candidate's row, the product's default first."""
    return [rule_row(scores, name, make(scores)) for name, make in CANDIDATES.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a fitted bundle directory or archive")
    parser.add_argument("data_dir", type=Path, help="the MVTec-layout folder it was fitted on")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        scores = study_scores(args.bundle, args.data_dir)
    except (BundleError, DataError) as exc:
        parser.exit(2, f"rule_study: {exc}\n")
    terms = {
        t: {
            "synthetic_auroc": synthetic_auroc(scores, Combiner({t: 1.0})),
            "auroc": auroc(scores.test[t], scores.labels),
        }
        for t in TERMS
    }
    print("each term alone: synthetic AUROC / test AUROC")
    for t, term in terms.items():
        print(f"  {t:<20} {term['synthetic_auroc']:.3f} / {term['auroc']:.3f}")
    rows = study(scores)
    print(f"{'rule':<22} {'synthetic':>9} {'AUROC':>6} {'TPR':>6} {'FPR':>6}  weights")
    for row in rows:
        weights = ", ".join(f"{t}={w:.2f}" for t, w in row.weights.items() if w)
        print(
            f"{row.name:<22} {row.synthetic_auroc:>9.3f} {row.auroc:>6.3f} {row.tpr:>6.3f} "
            f"{row.fpr:>6.3f}  {weights}"
        )
    if args.json is not None:
        document = {"terms": terms, "rules": [asdict(row) for row in rows]}
        args.json.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
