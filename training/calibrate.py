"""Calibration on held-out normal images and the decision rule.

The scores come from ONNX Runtime outputs through ``service.scoring.raw_scores``, so the stored
calibration is computed exactly as the service computes scores. The default rule (the weights of
the combined score and the side of the local window) was decided on two development datasets; the
coarse VAE's term joined it, at the same weight as the others, after the two confirmation
datasets showed large defects passing, and the terms are combined by their soft maximum rather
than their sum since held-out normals against synthetic defects preferred it on all four suite
datasets (see docs/quality-history.md). It is fixed, not searched per fit.
The latent and error references that the scores are read against are fitted on the training
images over the lighting range the training calls normal (:func:`fit_references`).
Each fit reports how the rule separates held-out normal images from synthetic defects of kinds
never trained on (:mod:`training.synth`), as a sanity figure, and how many held-out normal images
its threshold flags once they are lit a little darker or brighter (:func:`lighting_check`); test
images are never used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from service.preprocessing import PIXEL_SCALE, Images, model_input
from service.runtime import OnnxGraphs
from service.scoring import (
    TAIL_MIN_VALUES,
    Calibration,
    DecisionRule,
    ErrorReference,
    LatentGrid,
    LatentReference,
    ModelOutputs,
    batch_slices,
    fewest_for_conformal,
    lowest_conformal_rate,
    raw_scores,
)
from training.metrics import auroc
from training.synth import synthesised_batches

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
FloatArray = npt.NDArray[np.floating[Any]]

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "defect_probability": 1.0,
    "local_error": 1.0,
    "latent_distance": 1.0,
    "coarse_error": 1.0,
}
# The default local window is the shorter image side over this: specks of a few pixels count.
WINDOW_DIVISOR = 32
SYNTHETIC_COPIES = 4
# Past these counts a fit reads evenly spaced images (training.data.evenly_spaced), so that its
# cost beyond the training stays bounded however many good images a folder holds: the
# references' per-position means and per-cell Gaussians (each image read in three lightings) are
# settled long before REFERENCE_IMAGES, and the checks (the training's validation, the
# synthetic-defect AUROC, the lighting check) are figures for the log. Calibration reads every
# held-out image, keeping only its scores (:func:`score_held_out`).
REFERENCE_IMAGES = 1000
CHECK_IMAGES = 500
# Images scored at a time: memory holds one batch's outputs and maps, however many images a fit
# has (the graphs' own batches, OnnxGraphs.run_in_batches, are as large).
SCORING_BATCH = 32
# Past this share of held-out good images flagged under the training's change of light, the fit
# warns: a line whose light drifts that far would see many false alarms.
LIGHTING_WARNING_SHARE = 0.10


def joined_scores(parts: Sequence[Mapping[str, F64Array]]) -> dict[str, F64Array]:
    """The raw scores of consecutive batches as those of one batch."""
    if not parts:
        raise ValueError("joining needs the scores of at least one batch")
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def batched_raw_scores(
    images: F32Array,
    source: OnnxGraphs | ModelOutputs,
    window: int,
    reference: LatentReference,
    errors: ErrorReference,
) -> dict[str, F64Array]:
    """The raw scores of ``images``, a batch of ``SCORING_BATCH`` at a time: the graphs are run
    on each batch, or ``source`` already holds their outputs for every image. Only the scores,
    one number per image and score, are kept."""
    parts: list[dict[str, F64Array]] = []
    for rows in batch_slices(images.shape[0], SCORING_BATCH):
        batch = np.ascontiguousarray(images[rows])
        out = source.run(batch) if isinstance(source, OnnxGraphs) else source.rows(rows)
        parts.append(raw_scores(batch, out, window, reference, errors)[0])
    return joined_scores(parts)


@dataclass(frozen=True)
class RuleChoice:
    """The decision rule's window and weights, where they came from, and their synthetic AUROC."""

    local_window: int
    weights: Mapping[str, float]
    synthetic_auroc: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest's training section."""
        return {
            "local_window": self.local_window,
            "weights": dict(self.weights),
            "synthetic_auroc": self.synthetic_auroc,
            "method": self.method,
        }


def default_window(height: int, width: int) -> int:
    """The default local window: the shorter side over WINDOW_DIVISOR, at least 2 pixels."""
    return max(2, min(height, width) // WINDOW_DIVISOR)


def resolve_window(local_window: int | None, height: int, width: int) -> int:
    """The local window a fit uses: the one given, or :func:`default_window`."""
    return local_window if local_window is not None else default_window(height, width)


@dataclass(frozen=True)
class HeldOut:
    """What a fit keeps of its held-out images after one pass of the graphs over them: every
    image's raw scores at ``window`` and posterior mean, and the model input and graph outputs
    of the checked subset only."""

    window: int
    raw: dict[str, F64Array]
    mu: FloatArray  # (N, D)
    check_images: F32Array
    check_out: ModelOutputs


def score_held_out(
    graphs: OnnxGraphs,
    images: Images,
    *,
    scale: float = PIXEL_SCALE,
    window: int,
    reference: LatentReference,
    errors: ErrorReference,
    checked: slice,
) -> HeldOut:
    """Run the graphs over the held-out ``images`` (8-bit samples read at ``scale``, or model
    input) ``SCORING_BATCH`` at a time. Memory holds one batch's model input and outputs, the
    scores and posterior means, and the ``checked`` rows' input and outputs, however many images
    are held out; the batches are those of :func:`batched_raw_scores`, so the scores are the
    same."""
    wanted = np.arange(images.shape[0])[checked]
    parts: list[dict[str, F64Array]] = []
    mus: list[FloatArray] = []
    kept: list[F32Array] = []
    kept_out: list[ModelOutputs] = []
    for rows in batch_slices(images.shape[0], SCORING_BATCH):
        batch = np.ascontiguousarray(model_input(images[rows], scale))
        out = graphs.run(batch)
        parts.append(raw_scores(batch, out, window, reference, errors)[0])
        mus.append(out.mu)
        local = wanted[(wanted >= rows.start) & (wanted < rows.stop)] - rows.start
        kept.append(batch[local])
        kept_out.append(out.rows(local))
    return HeldOut(
        window=window,
        raw=joined_scores(parts),
        mu=np.concatenate(mus),
        check_images=np.concatenate(kept),
        check_out=ModelOutputs.joined(kept_out),
    )


def choose_rule(
    graphs: OnnxGraphs,
    reference: LatentReference,
    errors: ErrorReference,
    normal: F32Array,
    normal_out: ModelOutputs,
    *,
    seed: int,
    local_window: int | None,
    weights: Mapping[str, float] | None,
) -> RuleChoice:
    """The given window and weights, or the defaults, with their synthetic-defect AUROC.

    ``normal_out`` are the graphs' outputs for ``normal``, computed once by the caller."""
    _, _, height, width = normal.shape
    given = [
        part
        for part, value in (("window", local_window), ("weights", weights))
        if value is not None
    ]
    window = resolve_window(local_window, height, width)
    weighting = dict(weights) if weights is not None else dict(DEFAULT_WEIGHTS)
    normal_raw = batched_raw_scores(normal, normal_out, window, reference, errors)
    # The synthetic images are made and scored a batch at a time: only their scores are kept.
    synthetic_raw = joined_scores(
        [
            raw_scores(batch, graphs.run(batch), window, reference, errors)[0]
            for batch in synthesised_batches(
                normal, copies=SYNTHETIC_COPIES, seed=seed, batch=SCORING_BATCH
            )
        ]
    )
    made = normal.shape[0] * SYNTHETIC_COPIES
    labels = np.r_[np.zeros(normal.shape[0]), np.ones(made)]
    calibration = Calibration.fit(
        normal_raw, weighting, target_false_alarm_rate=0.5, local_window=window
    )
    combined = np.r_[calibration.combine(normal_raw), calibration.combine(synthetic_raw)]
    method = (
        (f"{' and '.join(given)} given by the user" if given else "the product's default rule")
        + f"; synthetic AUROC: held-out normal images against {made} synthetic "
        "defects of kinds never trained on (pasted patches, blotches, noise, relighting)"
    )
    return RuleChoice(window, weighting, auroc(combined, labels), method)


def calibrate(
    held_out: HeldOut, choice: RuleChoice, *, target_false_alarm_rate: float
) -> Calibration:
    """Fit the calibration of every score and the default threshold on the raw scores of the
    held-out normal images (:func:`score_held_out`, at the rule's window)."""
    if held_out.window != choice.local_window:
        raise ValueError(
            f"the held-out images were scored with a window of {held_out.window} pixels; the "
            f"rule's window is {choice.local_window}"
        )
    return Calibration.fit(
        held_out.raw,
        choice.weights,
        target_false_alarm_rate=target_false_alarm_rate,
        local_window=choice.local_window,
    )


def relight(images: F32Array, gain: float) -> F32Array:
    """``images`` with every pixel scaled by ``gain``, clipped to [0, 1]."""
    return np.asarray(np.clip(images * np.float32(gain), 0.0, 1.0), dtype=np.float32)


def lighting_gains(change: float) -> tuple[float, ...]:
    """The gains of the lighting range a training jitter of ``change`` calls normal: as they
    are, ``1 - change`` darker and ``1 + change`` brighter; only as they are when it is 0."""
    if not 0 <= change < 1:
        raise ValueError(f"lighting change is {change!r}; expected a number in [0, 1)")
    return (1.0,) if change == 0 else (1.0, 1 - change, 1 + change)


def fit_references(
    graphs: OnnxGraphs,
    train: Images,
    grid: LatentGrid,
    *,
    lighting: float,
    scale: float = PIXEL_SCALE,
) -> tuple[LatentReference, ErrorReference]:
    """The latent and error references of normal images, fitted on the training images (8-bit
    samples read at ``scale``, or model input) over the lighting range the training calls
    normal (its jitter, :func:`lighting_gains`): a dimmer or brighter good part is then read as
    the training read it, not as a defect.

    A batch of ``SCORING_BATCH`` images at a time, so that memory holds one batch's input and
    outputs and the running sums of the maps, however many training images there are."""
    mus: list[FloatArray] = []
    totals: dict[str, Any] = {f.name: 0.0 for f in fields(ErrorReference)}
    gains = lighting_gains(lighting)
    for gain in gains:
        for rows in batch_slices(train.shape[0], SCORING_BATCH):
            batch = np.ascontiguousarray(model_input(train[rows], scale))
            images = batch if gain == 1.0 else relight(batch, gain)
            outputs = graphs.run(images)
            mus.append(outputs.mu)
            means = ErrorReference.fit(images, outputs)
            for name in totals:
                totals[name] = totals[name] + getattr(means, name) * images.shape[0]
    count = len(gains) * train.shape[0]
    errors = ErrorReference(**{name: np.asarray(total / count) for name, total in totals.items()})
    return LatentReference.fit(np.concatenate(mus), grid), errors


@dataclass(frozen=True)
class LightingCheck:
    """The share of held-out normal images flagged as they are, and once every pixel is scaled by
    ``1 - change`` (darker) or ``1 + change`` (brighter, clipped at white)."""

    change: float
    flagged: float
    flagged_darker: float
    flagged_brighter: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form for the manifest's training section."""
        return asdict(self)


def lighting_check(
    graphs: OnnxGraphs,
    reference: LatentReference,
    errors: ErrorReference,
    normal: F32Array,
    normal_out: ModelOutputs,
    calibration: Calibration,
    *,
    change: float,
) -> LightingCheck:
    """How the calibrated threshold treats ``normal`` images under a global lighting change of
    ``change`` (the training's jitter: a change the model is told is not a defect)."""
    if not 0 < change < 1:
        raise ValueError(f"lighting change is {change!r}; expected a number in (0, 1)")

    def flagged(images: F32Array, out: ModelOutputs | None = None) -> float:
        source = out if out is not None else graphs
        raw = batched_raw_scores(images, source, calibration.local_window, reference, errors)
        return float(np.mean(calibration.score(raw).is_anomaly))

    _, darker, brighter = lighting_gains(change)
    return LightingCheck(
        change=change,
        flagged=flagged(normal, normal_out),
        flagged_darker=flagged(relight(normal, darker)),
        flagged_brighter=flagged(relight(normal, brighter)),
    )


def lighting_warning(check: LightingCheck) -> str | None:
    """A warning for the fit's log where light within the training's jitter, darker or brighter,
    makes the threshold flag more than ``LIGHTING_WARNING_SHARE`` of the held-out good images;
    ``None`` where it does not."""
    darker = check.flagged_darker >= check.flagged_brighter
    worse = check.flagged_darker if darker else check.flagged_brighter
    if worse <= LIGHTING_WARNING_SHARE:
        return None
    return (
        f"lit {check.change:.0%} {'darker' if darker else 'brighter'}, {worse:.1%} of the "
        "held-out good images would be flagged: keep the line's light as it was for these "
        "images, watch the drift gauges, and after a change of light calibrate the bundle "
        "again on good images taken in it (python -m service.recalibrate) or fit again"
    )


def describe_lighting(check: LightingCheck) -> str:
    """One line for the fit's log: the held-out images flagged as they are, darker and brighter."""
    return (
        f"lighting check: the threshold flags {check.flagged:.1%} of the held-out normal images, "
        f"{check.flagged_darker:.1%} of them {check.change:.0%} darker and "
        f"{check.flagged_brighter:.1%} {check.change:.0%} brighter"
    )


def describe_rule(rule: DecisionRule, held_out: int) -> str:
    """One line for the fit's log: the threshold, its target rate, and how ``held_out`` normal
    images set it (a conformal order statistic, or a Gaussian prediction bound where they are too
    few)."""
    kept = held_out - rule.outliers
    shaped = " after a transform fitted to their tail" if kept >= TAIL_MIN_VALUES else ""
    needed = fewest_for_conformal(rule.target_false_alarm_rate)
    if rule.method == "empirical":
        how = f"the conformal bound on {kept} held-out good images"
    elif kept >= needed:
        how = (
            f"the Gaussian prediction bound from {kept} held-out good images{shaped} at "
            f"{100 * lowest_conformal_rate(kept):.3g}%, the lowest rate their conformal bound "
            "reaches, which sits below the conformal bound at this rate: no rate gets a higher "
            "threshold than a lower one"
        )
    else:
        how = (
            f"a Gaussian prediction bound from {kept} held-out good images{shaped} (the "
            f"conformal bound at this rate needs {needed}; the fewer held out, the higher the "
            "bound sits above them: --holdout-fraction holds out more)"
        )
    left_out = (
        f"; {rule.outliers} far above the rest left out as parts that do not look good"
        if rule.outliers
        else ""
    )
    return (
        f"threshold {rule.threshold:.3f} for a {100 * rule.target_false_alarm_rate:g}% false-alarm "
        f"rate: {how}{left_out}"
    )
