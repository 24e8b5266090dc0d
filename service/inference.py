"""What one ONNX Runtime batch computes, and what each request makes of its rows.

A batch gives the raw scores and anomaly maps of its images (:func:`make_run_batch`, run by the
micro-batcher in its inference thread), whoever sent them. Everything that depends on a request's
options (its decision rule, whether it keeps anomaly maps) is computed afterwards for that
request's rows alone (:func:`score_rows`), in the request's own task: one request's options can
fail only that request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.batcher import FloatArray, Part, RunBatch
from service.metrics import ServiceMetrics
from service.model_slot import LoadedModel
from service.scoring import SCORE_NAMES, Calibration, DecisionRule, F64Array, ScoreBatch


@dataclass(frozen=True)
class ScoreParams:
    """A request's options: a decision-rule override (at most one of the two) and whether to
    return anomaly maps."""

    threshold: float | None = None
    target_false_alarm_rate: float | None = None
    keep_maps: bool = False

    def rule(self, calibration: Calibration) -> DecisionRule:
        """The rule these options ask for on ``calibration``; ValueError if one is out of range."""
        return calibration.rule_for(
            threshold=self.threshold, target_false_alarm_rate=self.target_false_alarm_rate
        )


@dataclass(frozen=True)
class RawBatch:
    """The output of one batch: raw scores ``{name: (N,)}`` and anomaly maps ``(N, H, W)``."""

    raw: dict[str, F64Array]
    maps: FloatArray


def make_run_batch(metrics: ServiceMetrics) -> RunBatch[LoadedModel, RawBatch]:
    """The micro-batcher's inference function: raw scores of a batch, observed in the metrics."""
    histograms = {name: metrics.scores.labels(name) for name in SCORE_NAMES}

    def run_batch(model: LoadedModel, x: FloatArray) -> RawBatch:
        raw, maps = model.scorer.raw_scores(x)
        for name, histogram in histograms.items():
            for value in raw[name].tolist():
                histogram.observe(value)
        return RawBatch(raw, maps)

    return run_batch


def score_rows(
    model: LoadedModel, parts: Sequence[Part[RawBatch]], rule: DecisionRule, keep_maps: bool
) -> list[ScoreBatch]:
    """One request's scores: its rows of each batch, calibrated and judged with its own rule."""
    calibration = model.scorer.calibration
    return [
        calibration.score(
            {name: values[part.start : part.stop] for name, values in part.output.raw.items()},
            rule,
            part.output.maps[part.start : part.stop] if keep_maps else None,
        )
        for part in parts
    ]


def count_scored(metrics: ServiceMetrics, model: LoadedModel, scored: Sequence[ScoreBatch]) -> None:
    """Count a request's scored and flagged images and observe their combined scores."""
    labels = (model.model_id, model.model_version)
    metrics.images_scored.labels(*labels).inc(sum(len(batch.combined) for batch in scored))
    flagged = sum(int(np.count_nonzero(batch.is_anomaly)) for batch in scored)
    metrics.images_flagged.labels(*labels).inc(flagged)
    for batch in scored:
        for value in batch.combined.tolist():
            metrics.combined_score.observe(value)
