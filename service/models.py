"""The served model: loading and self-testing a bundle, scoring batches, and hot reload.

:class:`ModelSlot` holds the :class:`LoadedModel` in service. A reload loads and self-tests the new
bundle in a worker thread and then swaps one reference: calls already holding the old model (and
batches already formed on it) finish on it, new calls get the new one. A bundle that fails to load
is refused, logged and counted, and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.batcher import FloatArray, Portion, RunBatch, ScoreParams
from service.bundle import BundleError, load_bundle
from service.metrics import ServiceMetrics
from service.preprocessing import InputSpec
from service.scorer import DeviceError, DevicePolicy, Scorer
from service.scoring import SCORE_NAMES, DecisionRule, ScoreBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A bundle loaded on a device and self-tested, with when and how it was loaded."""

    scorer: Scorer
    requested_device: DevicePolicy
    loaded_at: datetime

    @property
    def model_id(self) -> str:
        """Content hash of the ONNX files."""
        return self.scorer.model_id

    @property
    def model_version(self) -> str:
        """Human version given at training time."""
        return self.scorer.manifest.model_version

    @property
    def spec(self) -> InputSpec:
        """The preprocessing the model expects."""
        return self.scorer.manifest.input

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider in use."""
        return self.scorer.provider

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"model {self.model_id} version {self.model_version!r} from {self.scorer.bundle.path} "
            f"on {self.provider} (device policy {self.requested_device!r})"
        )


def load_model(bundle_path: Path, device: DevicePolicy, threads: int = 0) -> LoadedModel:
    """Load a bundle, open it on the device and run its golden self-test.

    Raises :class:`BundleError` for a missing, corrupt or mismatched bundle and
    :class:`DeviceError` for a device that cannot be used.
    """
    bundle = load_bundle(bundle_path)
    scorer = Scorer(bundle, device=device, threads=threads or None)
    scorer.self_test()
    return LoadedModel(scorer, device, datetime.now(UTC))


@dataclass(frozen=True)
class ScoredImages:
    """Scores of consecutive images of one job, with the model that produced them."""

    scores: ScoreBatch
    model_id: str
    model_version: str

    def __len__(self) -> int:
        return int(self.scores.combined.shape[0])


def _rule(model: LoadedModel, params: ScoreParams) -> DecisionRule:
    return model.scorer.calibration.rule_for(
        threshold=params.threshold, target_false_alarm_rate=params.target_false_alarm_rate
    )


def _part(batch: ScoreBatch, start: int, stop: int, threshold: float, maps: bool) -> ScoreBatch:
    combined = batch.combined[start:stop]
    return ScoreBatch(
        raw={name: values[start:stop] for name, values in batch.raw.items()},
        p_values={name: values[start:stop] for name, values in batch.p_values.items()},
        combined=combined,
        combined_p_value=batch.combined_p_value[start:stop],
        threshold=threshold,
        is_anomaly=combined >= threshold,
        anomaly_map=batch.anomaly_map[start:stop]
        if maps and batch.anomaly_map is not None
        else None,
    )


def make_run_batch(metrics: ServiceMetrics) -> RunBatch[LoadedModel, ScoredImages]:
    """The micro-batcher's inference function: score a batch, split it by job, count it."""
    scores_by_name = {name: metrics.scores.labels(name) for name in SCORE_NAMES}

    def run_batch(
        model: LoadedModel, x: FloatArray, portions: Sequence[Portion]
    ) -> list[ScoredImages]:
        keep_maps = any(portion.params.keep_maps for portion in portions)
        batch = model.scorer.score(x, keep_maps=keep_maps)
        rules: dict[ScoreParams, DecisionRule] = {}
        parts: list[ScoredImages] = []
        flagged = 0
        start = 0
        for portion in portions:
            params = portion.params
            if params not in rules:
                rules[params] = _rule(model, params)
            stop = start + portion.count
            part = _part(batch, start, stop, rules[params].threshold, params.keep_maps)
            flagged += int(np.count_nonzero(part.is_anomaly))
            parts.append(ScoredImages(part, model.model_id, model.model_version))
            start = stop
        labels = (model.model_id, model.model_version)
        metrics.images_scored.labels(*labels).inc(start)
        metrics.images_flagged.labels(*labels).inc(flagged)
        for name, child in scores_by_name.items():
            for value in batch.raw[name].tolist():
                child.observe(value)
        for value in batch.combined.tolist():
            metrics.combined_score.observe(value)
        return parts

    return run_batch


class ModelSlot:
    """The model in service, swapped atomically by :meth:`reload`."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: ServiceMetrics,
        *,
        bundle_path: Path,
        device: DevicePolicy,
        threads: int = 0,
    ) -> None:
        self.current = model
        self._metrics = metrics
        self._bundle_path = bundle_path
        self._device = device
        self._threads = threads
        self._lock = asyncio.Lock()
        self._publish()

    def _publish(self) -> None:
        model = self.current
        self._metrics.set_model(
            model_id=model.model_id,
            model_version=model.model_version,
            provider=model.provider,
            requested_device=model.requested_device,
            false_alarm_rate=model.scorer.calibration.rule.target_false_alarm_rate,
            threshold=model.scorer.calibration.rule.threshold,
        )

    async def reload(self) -> bool:
        """Load, self-test and swap in the bundle at the configured path; False if refused."""
        async with self._lock:
            log.info("reloading bundle %s", self._bundle_path)
            try:
                model = await asyncio.to_thread(
                    load_model, self._bundle_path, self._device, self._threads
                )
            except (BundleError, DeviceError, OSError) as exc:
                self._metrics.reloads.labels("failure").inc()
                log.error("reload refused, still serving model %s: %s", self.current.model_id, exc)
                return False
            previous, self.current = self.current, model
            self._publish()
            self._metrics.reloads.labels("success").inc()
            log.info("reloaded: now serving %s (was %s)", model.describe(), previous.model_id)
            return True
