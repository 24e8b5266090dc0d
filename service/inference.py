"""What one ONNX Runtime batch computes, and what each request makes of its rows.

A batch gives the raw scores, anomaly maps and posterior means of its images
(:func:`make_run_batch`, run by the micro-batcher in its inference thread), whoever sent them, and
adds its images to the drift window. Everything that depends on a request's options (its decision
rule, whether it keeps anomaly maps or posterior means) is computed afterwards for that request's
rows alone (:func:`score_rows`), in the request's own task: one request's options can fail only
that request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from service.batcher import FloatArray, Part, RunBatch
from service.drift import DriftMonitor
from service.metrics import ServiceMetrics
from service.model_slot import LoadedModel
from service.scoring import (
    SCORE_NAMES,
    Calibration,
    DecisionRule,
    F64Array,
    MapParts,
    ScoreBatch,
)


@dataclass(frozen=True)
class ScoreParams:
    """A request's options: a decision-rule override (at most one of the two) and whether to
    return anomaly maps and posterior means."""

    threshold: float | None = None
    target_false_alarm_rate: float | None = None
    keep_maps: bool = False
    keep_latent_means: bool = False

    def rule(self, calibration: Calibration) -> DecisionRule:
        """The rule these options ask for on ``calibration``; ValueError if one is out of range."""
        return calibration.rule_for(
            threshold=self.threshold, target_false_alarm_rate=self.target_false_alarm_rate
        )


@dataclass(frozen=True)
class RawBatch:
    """The output of one batch: raw scores ``{name: (N,)}``, what its anomaly maps are made of
    and posterior means ``(N, D)``."""

    raw: dict[str, F64Array]
    maps: MapParts
    mu: FloatArray


def make_run_batch(metrics: ServiceMetrics, drift: DriftMonitor) -> RunBatch[LoadedModel, RawBatch]:
    """The micro-batcher's inference function: raw scores of a batch, observed in the metrics and
    the drift window."""
    histograms = {name: metrics.scores.labels(name) for name in SCORE_NAMES}
    watch_drift = drift.settings.enabled

    def run_batch(model: LoadedModel, x: FloatArray) -> RawBatch:
        raw, maps, mu = model.scorer.raw_scores(x)
        for name, histogram in histograms.items():
            for value in raw[name].tolist():
                histogram.observe(value)
        if watch_drift:
            drift.observe(model, raw, mu)
        return RawBatch(raw, maps, mu)

    return run_batch


def score_rows(
    model: LoadedModel, parts: Sequence[Part[RawBatch]], rule: DecisionRule, params: ScoreParams
) -> list[ScoreBatch]:
    """One request's scores: its rows of each batch, calibrated and judged with its own rule,
    with the anomaly maps and posterior means it asked for."""
    calibration = model.scorer.calibration
    scored = []
    for part in parts:
        rows = slice(part.start, part.stop)
        batch = calibration.score(
            {name: values[rows] for name, values in part.output.raw.items()},
            rule,
            part.output.maps.rows(rows) if params.keep_maps else None,
        )
        if params.keep_latent_means:
            batch = replace(batch, latent_mean=part.output.mu[rows])
        scored.append(batch)
    return scored


def count_scored(metrics: ServiceMetrics, model: LoadedModel, scored: Sequence[ScoreBatch]) -> None:
    """Count a request's scored and flagged images and observe their combined scores."""
    labels = (model.model_id, model.model_version)
    metrics.images_scored.labels(*labels).inc(sum(len(batch.combined) for batch in scored))
    flagged = sum(int(np.count_nonzero(batch.is_anomaly)) for batch in scored)
    metrics.images_flagged.labels(*labels).inc(flagged)
    for batch in scored:
        for value in batch.combined.tolist():
            metrics.combined_score.observe(value)
