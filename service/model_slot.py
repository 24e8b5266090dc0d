"""The served model: loading and self-testing a bundle, and swapping it in on hot reload.

:class:`ModelSlot` holds the :class:`LoadedModel` in service. A reload loads and self-tests the new
bundle in a worker thread and then swaps one reference: calls already holding the old model (and
batches already formed on it) finish on it, new calls get the new one. A bundle that fails to load
is refused, logged and counted, and the old model keeps serving. Each model served gets a fresh
drift window (service/drift.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.bundle import BundleError
from service.drift import DriftMonitor
from service.metrics import ServiceMetrics
from service.preprocessing import InputSpec
from service.runtime import DeviceError, DevicePolicy, Scorer, open_scorer
from service.scoring import Calibration, LatentBaseline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A bundle loaded on a device and self-tested, with when and how it was loaded."""

    scorer: Scorer
    requested_device: DevicePolicy
    loaded_at: datetime
    source: Path  # the bundle directory or archive it was loaded from

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
    def calibration(self) -> Calibration:
        """What turns raw scores into p-values, a combined score and a verdict."""
        return self.scorer.calibration

    @property
    def calibration_size(self) -> int:
        """Number of held-out normal images the scores were calibrated on."""
        return len(self.calibration.combined.values)

    @property
    def latent_baseline(self) -> LatentBaseline:
        """Mean and spread of the held-out normal images' posterior means (for drift)."""
        return self.scorer.bundle.latent_baseline

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider in use."""
        return self.scorer.provider

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"model {self.model_id} version {self.model_version!r} from {self.source} "
            f"on {self.provider} (device policy {self.requested_device!r})"
        )


def load_model(bundle_path: Path, device: DevicePolicy, threads: int = 0) -> LoadedModel:
    """Load a bundle, open it on the device, run its golden self-test and check its calibration.

    Raises :class:`BundleError` for a missing, corrupt or mismatched bundle and
    :class:`DeviceError` for a device that cannot be used. An archive's unpacked files are
    removed once the ONNX Runtime sessions are open: nothing is left behind on disk.
    """
    scorer = open_scorer(bundle_path, device=device, threads=threads or None)
    _check_calibration(scorer)
    return LoadedModel(scorer, device, datetime.now(UTC), Path(bundle_path))


def _check_calibration(scorer: Scorer) -> None:
    """Score the golden inputs end to end, with the default rule and a rate override: a
    calibration that cannot (a weight on an unknown score, a non-finite threshold) is refused at
    load, rather than failing every request."""
    calibration = scorer.calibration
    try:
        with np.errstate(all="ignore"):
            scored = scorer.score(scorer.bundle.golden.inputs)
            override = calibration.rule_for(
                target_false_alarm_rate=calibration.rule.target_false_alarm_rate
            )
    except Exception as exc:  # a malformed calibration fails in as many ways as it is wrong
        raise BundleError(
            f"the calibration cannot score the golden inputs: {type(exc).__name__}: {exc}"
        ) from exc
    values = [scored.combined, scored.combined_p_value, *scored.p_values.values()]
    values.append(np.array([calibration.rule.threshold, override.threshold]))
    if not all(np.all(np.isfinite(v)) for v in values):
        raise BundleError(
            "the calibration gives non-finite scores, p-values or thresholds on the golden "
            f"inputs (default threshold {calibration.rule.threshold}, threshold for the default "
            f"rate {override.threshold})"
        )


class ModelSlot:
    """The model in service, swapped atomically by :meth:`reload`."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: ServiceMetrics,
        drift: DriftMonitor,
        *,
        bundle_path: Path,
        device: DevicePolicy,
        threads: int = 0,
    ) -> None:
        self.current = model
        self._metrics = metrics
        self._drift = drift
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
        self._drift.start(
            model,
            model_id=model.model_id,
            model_version=model.model_version,
            calibration=model.calibration,
            baseline=model.latent_baseline,
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
            except Exception:  # a fault of this software, not of the bundle: say so, keep serving
                self._metrics.reloads.labels("failure").inc()
                log.exception("reload failed, still serving model %s", self.current.model_id)
                return False
            previous, self.current = self.current, model
            self._publish()
            self._metrics.reloads.labels("success").inc()
            log.info("reloaded: now serving %s (was %s)", model.describe(), previous.model_id)
            return True
