"""Calibrate a bundle again on good images from the line, without training it again.

``python -m service.recalibrate BUNDLE GOOD_DIR --out NEW_BUNDLE`` (or ``anomaly-recalibrate``).
A fit calibrates its scores and sets its threshold on the good images it held out, photographed
as its training images were. Where the line's light, camera or parts have since changed within
what the model still reads (the drift gauges move, the fit's lighting check warned), good parts
score differently and the threshold no longer gives the false-alarm rate it was set for: good
images taken on the line now, checked by an operator, set it again. Every score's
standardisation, the combined score's calibration, the threshold (at the bundle's own target
rate, by :func:`service.scoring.threshold_for_rate`) and the drift gauges' latent baseline are
fitted on them; the graphs, references and golden vectors are copied unchanged, so the raw scores
of an image stay what they were. The new bundle is loaded and passes its golden self-test before
it takes its name; the old one is left as it was.

The images must be ones the model never trained on: a training image scores as the model learned
it, lower than a new good part, and would set the threshold too low. The folder the bundle was
trained on is refused (its fingerprint is in the manifest).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import (
    FORMAT_VERSION,
    LATENT_REFERENCE,
    BundleError,
    compute_model_id,
    write_latent_reference,
    write_manifest,
)
from service.bundle_copy import BundleCopy
from service.config import DEVICES
from service.preprocessing import (
    ImageFiles,
    InputSpec,
    list_image_files,
    preprocess_bytes,
    stack,
)
from service.runtime import DeviceError, DevicePolicy, Scorer, open_scorer
from service.scoring import (
    TAIL_MIN_VALUES,
    Calibration,
    DecisionRule,
    F64Array,
    LatentBaseline,
    LatentMoments,
    fewest_for_conformal,
)

PROG = "anomaly-recalibrate"
# Fewer good images than this cannot pin down the tail a threshold is set in.
MIN_IMAGES = TAIL_MIN_VALUES
# Images read and scored at a time: memory holds one batch of model input and ONNX Runtime's
# buffers for it, whatever the count. 1,280 screw images (256x256, the suite's bundle): peak RSS
# 0.69 GB in batches of 8 against 1.81 GB in batches of 32, 35 s either way, the same threshold.
BATCH = 8
# Past this share of the new images flagged by the bundle's own threshold, the line's good parts
# no longer look like the ones the model was fitted on: the operator is told to check them.
FLAGGED_WARNING_SHARE = 0.5
# Below this many images the operator is told the threshold is loose: calibrated on 20 held-out
# good images of each suite bundle, a 1% rate flagged 0.7-4.6% of the rest, from 40 1.7-3.4%.
ADVISED_IMAGES = 40

log = logging.getLogger(__name__)

_TRAINING_FOLDER = (
    "{good} holds the images this bundle was trained on{how}: they score as the model learned "
    "them and would set the threshold too low; give good images it never trained on (taken on "
    "the line since)"
)


class RecalibrationError(ValueError):
    """The good images cannot calibrate the bundle: what is wrong and what to do."""


@dataclass(frozen=True)
class Recalibration:
    """What a recalibration changed, and how each threshold treats the new good images."""

    images: int
    skipped: tuple[tuple[str, str], ...]
    previous: DecisionRule
    current: DecisionRule
    flagged_by_previous: float  # share of the new images the bundle's own threshold flagged
    flagged: float  # share of them the new threshold flags (outliers left out included)


@dataclass(frozen=True)
class _Scored:
    raw: dict[str, F64Array]
    baseline: LatentBaseline
    fingerprint: str
    count: int
    skipped: tuple[tuple[str, str], ...]


def _score_folder(scorer: Scorer, folder: Path, *, skip_bad: bool) -> _Scored:
    """Every image of ``folder`` read as the bundle reads its input and scored, ``BATCH`` at a
    time: the raw scores and the posterior means' moments are kept, not the images."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a directory"
        raise RecalibrationError(f"good-image folder {folder} {what}")
    paths = list_image_files(folder)
    if not paths:
        raise RecalibrationError(
            f"good-image folder {folder} holds no images directly (give the folder the images "
            "are in)"
        )
    spec = scorer.manifest.input
    files = ImageFiles(skip_bad, RecalibrationError)
    raw_parts: list[dict[str, F64Array]] = []
    moments = LatentMoments()
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            raw, _, mu = scorer.raw_scores(stack(batch))
            raw_parts.append(raw)
            moments.add(mu)
            batch.clear()

    decode = partial(_decoded, spec=spec)
    for _, image in files.read(paths, decode):
        batch.append(image)
        if len(batch) == BATCH:
            flush()
    flush()
    count = moments.count
    if count < MIN_IMAGES:
        raise RecalibrationError(
            f"{count} readable good images in {folder}; recalibrating needs at least "
            f"{MIN_IMAGES} to set a threshold (the more, the closer it holds its rate: "
            f"from {fewest_for_conformal(scorer.calibration.rule.target_false_alarm_rate)} it is "
            "a conformal bound)"
        )
    raw = {name: np.concatenate([part[name] for part in raw_parts]) for name in raw_parts[0]}
    skipped = tuple((path.name, why) for path, why in files.skipped)
    return _Scored(raw, moments.baseline(), files.fingerprint.hexdigest(), count, skipped)


def _decoded(data: bytes, image_id: str, *, spec: InputSpec) -> np.ndarray:
    return preprocess_bytes(data, spec, image_id=image_id)


def recalibrate_bundle(
    source: Path,
    good: Path,
    out: Path,
    *,
    skip_bad: bool = False,
    device: DevicePolicy = "auto",
    now: str | None = None,
) -> Recalibration:
    """Write to ``out`` (which must not exist) a copy of the bundle directory ``source``
    calibrated on the good images directly in ``good``; the copy is loaded and passes its
    golden self-test before it takes that name. Raises :class:`RecalibrationError`,
    :class:`BundleError` or :class:`DeviceError`."""
    copy = BundleCopy.plan(source, out)
    good = Path(good)
    scorer = open_scorer(copy.source, device=device)
    manifest = scorer.manifest
    trained_on = manifest.training.get("data") or {}
    if good.is_dir() and str(good.resolve()) == trained_on.get("folder"):
        raise RecalibrationError(_TRAINING_FOLDER.format(good=good, how=""))
    scored = _score_folder(scorer, good, skip_bad=skip_bad)
    if scored.fingerprint == trained_on.get("fingerprint"):
        raise RecalibrationError(_TRAINING_FOLDER.format(good=good, how=" (a copy of them)"))
    previous = manifest.calibration
    calibration = Calibration.fit(
        scored.raw,
        previous.weights,
        target_false_alarm_rate=previous.rule.target_false_alarm_rate,
        local_window=previous.local_window,
        extra=previous.extra,
    )
    flagged_by_previous = float(np.mean(previous.score(scored.raw).is_anomaly))
    flagged = float(np.mean(calibration.score(scored.raw).is_anomaly))
    record: dict[str, Any] = {
        "at": now or datetime.now(UTC).isoformat(),
        "folder": str(good.resolve()),
        "fingerprint": scored.fingerprint,
        "images": scored.count,
        "skipped": [{"file": name, "reason": reason} for name, reason in scored.skipped],
        "previous_model_id": manifest.model_id,
        "previous_rule": asdict(previous.rule),
        "flagged_by_previous_rule": flagged_by_previous,
        "flagged": flagged,
    }
    training = dict(manifest.training)
    if "lighting" in training:
        # Measured on the fit's held-out images with the previous threshold.
        record["lighting_with_previous_calibration"] = training.pop("lighting")
    training["recalibrations"] = [*training.get("recalibrations", []), record]
    with copy.writing() as partial:
        write_latent_reference(
            partial / LATENT_REFERENCE,
            scorer.bundle.latent_reference,
            scored.baseline,
        )
        current = replace(
            manifest,
            model_id=compute_model_id(partial),
            calibration=calibration,
            training=training,
        )
        write_manifest(partial, current)
    return Recalibration(
        scored.count, scored.skipped, previous.rule, calibration.rule, flagged_by_previous, flagged
    )


def describe(result: Recalibration, source: Path, good: Path, out: Path) -> str:
    """What the operator is told: the thresholds, and how each treats the new good images."""
    rule = result.current
    left_out = f", {rule.outliers} far above the rest left out" if rule.outliers else ""
    skipped = f" ({len(result.skipped)} unreadable skipped)" if result.skipped else ""
    return (
        f"recalibrated {source} on {result.images} good images from {good}{skipped} into {out}: "
        f"threshold {result.previous.threshold:.4f} -> {rule.threshold:.4f} for a "
        f"{100 * rule.target_false_alarm_rate:g}% false-alarm rate ({rule.method}{left_out}); "
        f"the previous threshold flagged {100 * result.flagged_by_previous:.1f}% of these "
        f"images, the new one flags {100 * result.flagged:.1f}%; the drift gauges now compare "
        "traffic with these images. To serve it, put it where the service's --bundle points "
        "(swap the directory or a symlink) and send the service SIGHUP"
    )


def warnings(result: Recalibration) -> list[str]:
    """What the operator should check: where the bundle's own threshold flagged most of the new
    images (they may hold defects or another part, which a calibration would then call good), and
    where too few images set the threshold to hold its rate closely."""
    found = []
    if result.flagged_by_previous > FLAGGED_WARNING_SHARE:
        found.append(
            f"the bundle's own threshold flagged {100 * result.flagged_by_previous:.0f}% of these "
            "images: check that they are all good parts of the part this model was trained on; "
            "a calibration on defects or on another part calls them good"
        )
    if result.images < ADVISED_IMAGES:
        found.append(
            f"{result.images} good images set a loose threshold: set on fewer than "
            f"{ADVISED_IMAGES}, a threshold flags more good parts than the rate it was set for "
            "(on the quality suite's bundles, 20 images set for 1% flagged up to 4.6% of other "
            f"good images); recalibrate again on {ADVISED_IMAGES} or more when the line has them"
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrate a bundle again on good images taken on the line, without training it "
            "again: every score's standardisation, the threshold (at the bundle's own "
            "false-alarm rate) and the drift baseline are fitted on them; the models are copied "
            f"unchanged. Bundles of format {FORMAT_VERSION}."
        ),
    )
    parser.add_argument("bundle", type=Path, help="the bundle directory to recalibrate")
    parser.add_argument(
        "good", type=Path, help="a folder of good images the model never trained on"
    )
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the bundle")
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of failing"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="ONNX Runtime device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        result = recalibrate_bundle(
            args.bundle, args.good, args.out, skip_bad=args.skip_bad_images, device=args.device
        )
    except (RecalibrationError, BundleError, DeviceError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(describe(result, args.bundle, args.good, args.out))
    for caution in warnings(result):
        print(f"{PROG}: warning: {caution}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
