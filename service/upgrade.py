"""Bring a bundle of an older format up to date without training it again.

``python -m service.upgrade OLD_BUNDLE --out NEW_BUNDLE`` (or ``anomaly-upgrade``). Formats 8 to 10
differ from the current one only in how the threshold follows from the held-out combined scores
that the manifest keeps (format 8: the Gaussian prediction bound on them as they are; format 9:
after a tail transform that could also shorten the tail; format 10: a conformal bound could sit
above the Gaussian bound of a lower rate), so the threshold is set again from those scores by
:func:`service.scoring.threshold_for_rate`, at the bundle's own target rate. The model files,
references and golden vectors are copied unchanged.

Where the threshold changes, the fit's lighting check (``training.lighting``: the share of
held-out images the threshold flags as they are and lit 10% darker and brighter), measured with
the previous threshold, needs the held-out images to be measured again: it moves to
``training.upgraded`` beside the previous rule, kept as it was and not read as a figure of the
new threshold. Where the threshold is the same, it stays where it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import (
    FORMAT_VERSION,
    UPGRADABLE_FORMATS,
    BundleError,
    Manifest,
    read_manifest_json,
    write_manifest,
)
from service.bundle_copy import BundleCopy
from service.runtime import DeviceError
from service.scoring import DecisionRule, fewest_for_conformal, threshold_for_rate

PROG = "anomaly-upgrade"


@dataclass(frozen=True)
class Upgrade:
    """What an upgrade changed: the format and the default rule."""

    from_format: int
    previous: DecisionRule
    current: DecisionRule
    held_out: int  # the held-out combined scores the rule is set from


def upgraded_manifest(raw: Mapping[str, Any], *, now: str) -> tuple[Manifest, Upgrade]:
    """The current-format manifest of an upgradable one, read as JSON; raises
    :class:`BundleError` for a manifest this module cannot bring up to date."""
    version = raw.get("format_version")
    if version == FORMAT_VERSION:
        raise BundleError(f"the bundle is already format {FORMAT_VERSION}: nothing to upgrade")
    if type(version) is not int or version not in UPGRADABLE_FORMATS:
        raise BundleError(
            f"a bundle of format_version {version!r} cannot be upgraded (formats "
            f"{', '.join(map(str, UPGRADABLE_FORMATS))} can): train it again with "
            "`python -m training fit`"
        )
    manifest = Manifest.from_dict({**raw, "format_version": FORMAT_VERSION})
    stored = manifest.calibration.rule
    values = np.asarray(manifest.calibration.combined.values, dtype=np.float64)
    try:
        rule = threshold_for_rate(values, stored.target_false_alarm_rate)
    except ValueError as exc:
        raise BundleError(f"cannot set the threshold again: {exc}") from exc
    # Every older format set a conformal threshold wherever the values kept reach one.
    kept = values.size - rule.outliers
    method = (
        "empirical"
        if kept >= fewest_for_conformal(stored.target_false_alarm_rate)
        else "normal_tail"
    )
    if (method, rule.outliers) != (stored.method, stored.outliers):
        raise BundleError(
            f"the manifest's rule ({stored.method}, {stored.outliers} held-out scores left out) "
            f"does not follow from its {values.size} held-out combined scores ({method}, "
            f"{rule.outliers} left out): the manifest was edited; train the bundle again"
        )
    training = dict(manifest.training)
    record: dict[str, Any] = {
        "from_format_version": version,
        "at": now,
        "previous_rule": asdict(stored),
    }
    if "lighting" in training and rule.threshold != stored.threshold:
        record["lighting_with_previous_threshold"] = training.pop("lighting")
    training["upgraded"] = record
    current = replace(
        manifest,
        calibration=replace(manifest.calibration, rule=rule),
        training=training,
    )
    return current, Upgrade(int(version), stored, rule, int(values.size))


def upgrade_bundle(source: Path, out: Path) -> Upgrade:
    """Write the upgraded copy of the bundle directory ``source`` to ``out``, which must not
    exist; the copy is loaded and passes its golden self-test before it takes that name, and
    ``source`` is left as it was. Raises :class:`BundleError` or :class:`DeviceError`."""
    copy = BundleCopy.plan(source, out)
    raw = read_manifest_json(copy.source)
    manifest, upgrade = upgraded_manifest(raw, now=datetime.now(UTC).isoformat())
    with copy.writing() as partial:
        write_manifest(partial, manifest)
    return upgrade


def describe(upgrade: Upgrade, source: Path, out: Path) -> str:
    """One line for the operator: what changed and what was set aside."""
    previous, current = upgrade.previous.threshold, upgrade.current.threshold
    if current == previous:
        change = f"threshold {current:.4f}, the same"
        lighting = "the fit's lighting check stands"
    else:
        change = f"threshold {previous:.4f} -> {current:.4f}"
        lighting = (
            "the fit's lighting check was measured with the previous threshold and is kept under "
            "training.upgraded: fit again to measure it with this one"
        )
    return (
        f"upgraded {source} (format {upgrade.from_format}) to format {FORMAT_VERSION} at {out}: "
        f"{change} for a {upgrade.current.target_false_alarm_rate:.4g} false-alarm rate "
        f"({upgrade.current.method}, from {upgrade.held_out} held-out scores, "
        f"{upgrade.current.outliers} left out as outliers); {lighting}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            f"Bring a bundle of format {', '.join(map(str, UPGRADABLE_FORMATS))} up to format "
            f"{FORMAT_VERSION} without training it again: its threshold is set again from the "
            "held-out scores its manifest keeps; the models are copied unchanged."
        ),
    )
    parser.add_argument("bundle", type=Path, help="the bundle directory to upgrade")
    parser.add_argument(
        "--out", type=Path, required=True, help="a new directory for the upgraded bundle"
    )
    args = parser.parse_args(argv)
    try:
        upgrade = upgrade_bundle(args.bundle, args.out)
    except (BundleError, DeviceError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(describe(upgrade, args.bundle, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
