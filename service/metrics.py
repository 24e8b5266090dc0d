"""All Prometheus metrics of the service, defined in one place.

Names follow Prometheus conventions (base units, ``_total`` for counters). Every metric lives in
the registry given to :class:`ServiceMetrics`, so tests use a fresh ``CollectorRegistry``.
The anomaly rate is ``rate(anomaly_images_flagged_total) / rate(anomaly_images_scored_total)``.
The drift gauges (``anomaly_drift_*``) are set by service/drift.py, which explains the statistics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "anomaly"

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Raw scores span decades across models (MSE ~1e-3, KL ~1e1): two buckets per decade.
RAW_SCORE_BUCKETS = tuple(10.0 ** (e / 2) for e in range(-14, 11))
# The combined score is a soft maximum of standardised scores: good parts score about 0 to 4 with
# the default threshold near 3.5, defects up to about 10. Half-unit buckets from -2 to 12.
COMBINED_SCORE_BUCKETS = tuple(v / 2 for v in range(-4, 25))
MODEL_LABELS = ("model_id", "model_version")


class ServiceMetrics:
    """The service's metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "gRPC calls finished, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.images_scored = Counter(
            f"{PREFIX}_images_scored_total",
            "Images scored, by model.",
            MODEL_LABELS,
            registry=registry,
        )
        self.images_flagged = Counter(
            f"{PREFIX}_images_flagged_total",
            "Images whose verdict was anomalous, by model.",
            MODEL_LABELS,
            registry=registry,
        )
        self.image_errors = Counter(
            f"{PREFIX}_image_errors_total",
            "Images that could not be scored, by status code (the call itself may have been OK).",
            ["code"],
            registry=registry,
        )
        self.scores = Histogram(
            f"{PREFIX}_score",
            "Raw scores of scored images, by score type.",
            ["score"],
            buckets=RAW_SCORE_BUCKETS,
            registry=registry,
        )
        self.combined_score = Histogram(
            f"{PREFIX}_combined_score",
            "Combined score of scored images (the score the verdict is based on).",
            buckets=COMBINED_SCORE_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a call (or stream message) to sending its reply, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time images waited in the micro-batcher queue before inference.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Time of one ONNX Runtime batch (encoder, decoder and scoring).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size_images",
            "Images per ONNX Runtime batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth_images",
            "Images held for calls: being decoded, waiting for inference, scored, or (streams) "
            "waiting for their reply to be sent.",
            registry=registry,
        )
        self.queue_capacity = Gauge(
            f"{PREFIX}_queue_capacity_images",
            "Most images the server holds for calls before refusing work.",
            registry=registry,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests",
            "gRPC calls being served.",
            registry=registry,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The model being served (value 1): id, version, the execution provider in use and "
            "the device policy that was asked for.",
            ["model_id", "model_version", "provider", "requested_device"],
            registry=registry,
        )
        self.expected_false_alarm_rate = Gauge(
            f"{PREFIX}_expected_false_alarm_rate",
            "False-alarm rate on normal images that the default threshold was calibrated for.",
            registry=registry,
        )
        self.reloads = Counter(
            f"{PREFIX}_model_reloads_total",
            "Bundle reload attempts, by result (success, failure).",
            ["result"],
            registry=registry,
        )
        self.decision_threshold = Gauge(
            f"{PREFIX}_decision_threshold",
            "Default threshold on the combined score (requests may override it).",
            registry=registry,
        )
        self.drift_window = Gauge(
            f"{PREFIX}_drift_window_images",
            "Images in the drift window of the model in service (its most recent images).",
            MODEL_LABELS,
            registry=registry,
        )
        self.drift_window_size = Gauge(
            f"{PREFIX}_drift_window_size_images",
            "Size of the drift window; the drift statistics are computed once it is full.",
            MODEL_LABELS,
            registry=registry,
        )
        self.drift_p_value_ks = Gauge(
            f"{PREFIX}_drift_p_value_ks_statistic",
            "Kolmogorov-Smirnov distance between the combined p-values of the drift window and "
            "the uniform distribution they have for normal images (NaN until the window is full).",
            MODEL_LABELS,
            registry=registry,
        )
        self.drift_p_value_ks_threshold = Gauge(
            f"{PREFIX}_drift_p_value_ks_threshold",
            "The p-value KS distance above which the drift window no longer looks normal.",
            MODEL_LABELS,
            registry=registry,
        )
        self.drift_latent_shift = Gauge(
            f"{PREFIX}_drift_latent_shift",
            "RMS over latent dimensions of the drift window's mean posterior mean minus that of "
            "the held-out normal images, in their standard deviations (NaN until the window is "
            "full).",
            MODEL_LABELS,
            registry=registry,
        )
        self.drift_latent_shift_threshold = Gauge(
            f"{PREFIX}_drift_latent_shift_threshold",
            "The latent shift above which the drift window no longer looks normal.",
            MODEL_LABELS,
            registry=registry,
        )
        # Series exist at 0 from the start, so that rate() and increase() see their first jump.
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def set_model(
        self,
        *,
        model_id: str,
        model_version: str,
        provider: str,
        requested_device: str,
        false_alarm_rate: float,
        threshold: float,
    ) -> None:
        """Publish the served model, replacing the previous one's info series."""
        self.model_info.clear()
        self.model_info.labels(model_id, model_version, provider, requested_device).set(1)
        self.expected_false_alarm_rate.set(false_alarm_rate)
        self.decision_threshold.set(threshold)
        self.images_scored.labels(model_id, model_version)
        self.images_flagged.labels(model_id, model_version)

    def drift_gauges(self) -> tuple[Gauge, ...]:
        """Every drift gauge (all labelled with the model)."""
        return (
            self.drift_window,
            self.drift_window_size,
            self.drift_p_value_ks,
            self.drift_p_value_ks_threshold,
            self.drift_latent_shift,
            self.drift_latent_shift_threshold,
        )
