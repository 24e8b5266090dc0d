"""Between the wire and numpy: request checks, image decoding into batch rows, result messages."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from PIL import Image

from service._proto import anomaly_pb2 as pb
from service.batcher import FloatArray
from service.drift import DriftSettings
from service.inference import ScoreParams
from service.model_slot import LoadedModel
from service.preprocessing import (
    ImageError,
    InputSpec,
    decode_image,
    image_from_raw,
    preprocess_into,
)
from service.scoring import SCORE_NAMES, ScoreBatch

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Unparseable:
    """Stands in for a request message whose bytes do not parse, so that the call can answer it."""

    type_name: str
    size: int
    reason: str

    def describe(self) -> str:
        """What was wrong, without Python internals."""
        return f"not a valid {self.type_name} message ({self.size} bytes): {self.reason}"


def lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """``parse`` returning :class:`Unparseable` instead of raising on bytes it cannot parse."""

    def parse_or_describe(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, and whatever else the parser raises on bad bytes
            return Unparseable(type_name, len(data), str(exc) or type(exc).__name__)

    return parse_or_describe


@dataclass(frozen=True)
class Limits:
    """Request limits the server enforces (reported in ModelInfo)."""

    max_images_per_request: int
    max_image_pixels: int
    max_message_bytes: int


def score_params(options: pb.ScoreOptions) -> ScoreParams:
    """The scoring parameters of a request's options; ValueError says what is out of range."""
    decision = options.WhichOneof("decision")
    threshold = rate = None
    if decision == "threshold":
        threshold = options.threshold
        if not math.isfinite(threshold):
            raise ValueError(f"options.threshold is {threshold}; expected a finite number")
    elif decision == "target_false_alarm_rate":
        rate = options.target_false_alarm_rate
        if not 0.0 < rate < 1.0:
            raise ValueError(
                f"options.target_false_alarm_rate is {rate}; expected a number strictly "
                "between 0 and 1"
            )
    return ScoreParams(threshold, rate, options.return_anomaly_map, options.return_latent_mean)


def check_batch(images: Sequence[pb.Image], max_images: int) -> None:
    """Request-level checks of a ScoreBatch: ValueError for no images, too many, duplicate ids."""
    if not images:
        raise ValueError(f"the request has no images; expected 1 to {max_images}")
    if len(images) > max_images:
        raise ValueError(
            f"the request has {len(images)} images; this server takes at most {max_images} "
            "per ScoreBatch (split it, or use ScoreStream)"
        )
    seen: set[str] = set()
    for image in images:
        if image.id in seen:
            raise ValueError(
                f"image id {image.id!r} appears more than once; ids must be unique within a "
                "ScoreBatch"
            )
        seen.add(image.id)


def to_pil(image: pb.Image, max_pixels: int) -> Image.Image:
    """The PIL image of a wire image; ImageError names the image id and what was expected."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return decode_image(image.encoded, image_id=image.id, max_pixels=max_pixels)
    if kind == "raw":
        raw = image.raw
        return image_from_raw(
            raw.pixels,
            raw.height,
            raw.width,
            raw.channels,
            image_id=image.id,
            max_pixels=max_pixels,
        )
    raise ImageError(
        f"image {image.id!r} has no data; expected encoded bytes (PNG, JPEG, BMP, TIFF) or raw "
        "pixels"
    )


def decode_into(
    images: Sequence[pb.Image], spec: InputSpec, out: FloatArray, max_pixels: int
) -> dict[int, str]:
    """Preprocess ``images`` into the rows of ``out``; return {index: error} of those that fail.

    Runs in a worker thread (PIL releases the GIL while decoding and resizing).
    """
    errors: dict[int, str] = {}
    for index, image in enumerate(images):
        try:
            preprocess_into(to_pil(image, max_pixels), spec, out[index])
        except ImageError as exc:
            errors[index] = str(exc)
    return errors


def error_result(image_id: str, code: grpc.StatusCode, message: str) -> pb.ImageResult:
    """The result of an image that could not be scored."""
    return pb.ImageResult(id=image_id, error=pb.ImageError(code=code.value[0], message=message))


def scored_results(
    ids: Iterable[str], scored: Iterable[ScoreBatch], model_id: str
) -> list[pb.ImageResult]:
    """Result messages of scored images, in order: ``ids`` pairs with the images of ``scored``."""
    results: list[pb.ImageResult] = []
    id_iter = iter(ids)
    for batch in scored:
        # One column per field of the Scores message: each score and its p-value by name.
        columns: dict[str, list[Any]] = {
            **{name: batch.raw[name].tolist() for name in SCORE_NAMES},
            **{f"{name}_p_value": batch.p_values[name].tolist() for name in SCORE_NAMES},
            "combined": batch.combined.tolist(),
            "combined_p_value": batch.combined_p_value.tolist(),
            "is_anomaly": batch.is_anomaly.tolist(),
        }
        maps = batch.anomaly_map
        means = None if batch.latent_mean is None else batch.latent_mean.tolist()
        for index in range(len(batch.combined)):
            scores = pb.Scores(
                threshold=batch.threshold,
                **{field: values[index] for field, values in columns.items()},
            )
            if maps is not None:
                amap = maps[index]
                scores.anomaly_map.height, scores.anomaly_map.width = amap.shape
                scores.anomaly_map.values = amap.astype("<f4", copy=False).tobytes()
            if means is not None:
                scores.latent_mean.extend(means[index])
            results.append(pb.ImageResult(id=next(id_iter), scores=scores, model_id=model_id))
    return results


def rfc3339(moment: datetime) -> str:
    """``2024-05-01T12:00:00Z`` for an aware UTC datetime."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def drift_monitoring(model: LoadedModel, settings: DriftSettings) -> pb.DriftMonitoring | None:
    """The DriftMonitoring message of a loaded model; None when drift is not watched."""
    if not settings.enabled:
        return None
    baseline = model.latent_baseline
    thresholds = settings.for_model(model.calibration_size, baseline)
    return pb.DriftMonitoring(
        window_size=thresholds.window,
        p_value_ks_threshold=thresholds.p_value_ks,
        latent_shift_threshold=thresholds.latent_shift,
        latent_dimensions=thresholds.latent_dimensions,
        latent_baseline_size=baseline.count,
    )


def model_info(model: LoadedModel, limits: Limits, drift: DriftSettings) -> pb.ModelInfo:
    """The ModelInfo message of a loaded model served with these limits and drift settings."""
    manifest = model.scorer.manifest
    calibration = manifest.calibration
    rule = calibration.rule
    spec = manifest.input
    return pb.ModelInfo(
        model_id=model.model_id,
        model_version=model.model_version,
        bundle_format_version=manifest.format_version,
        execution_provider=model.provider,
        input=pb.InputSpec(
            height=spec.height,
            width=spec.width,
            channels=spec.channels,
            color_mode=spec.color_mode,
            resize=spec.resize,
            wide_sample_bits=spec.wide_sample_bits,
        ),
        latent_dim=manifest.latent_dim,
        default_rule=pb.DecisionRule(
            threshold=rule.threshold,
            target_false_alarm_rate=rule.target_false_alarm_rate,
            method=rule.method,
            outliers_left_out=rule.outliers,
        ),
        calibration_size=model.calibration_size,
        trained_at=manifest.created_at,
        loaded_at=rfc3339(model.loaded_at),
        limits=pb.ServingLimits(
            max_images_per_request=limits.max_images_per_request,
            max_image_pixels=limits.max_image_pixels,
            max_message_bytes=limits.max_message_bytes,
        ),
        local_window=calibration.local_window,
        latent_grid=pb.LatentGrid(
            channels=manifest.latent.channels,
            rows=manifest.latent.rows,
            columns=manifest.latent.columns,
        ),
        combined_weights=dict(calibration.weights),
        drift=drift_monitoring(model, drift),
    )


def empty_rows(count: int, spec: InputSpec) -> FloatArray:
    """An uninitialised ``(count, C, H, W)`` float32 batch to decode into."""
    return np.empty((count, *spec.shape), dtype=np.float32)
