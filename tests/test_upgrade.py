"""Upgrading a bundle of an older format without training it again (service/upgrade.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import FORMAT_VERSION, MANIFEST, BundleError, load_bundle
from service.bundle_copy import PARTIAL_SUFFIX
from service.runtime import open_scorer
from service.scoring import threshold_for_rate
from service.upgrade import main, upgrade_bundle

# Held-out combined scores with a short upper tail (a format-9 fit would have taken lambda > 1):
# 60 of them, none far above the rest, so the rule is a normal_tail bound with no outliers.
SHORT_TAIL = np.sort(5.0 - np.random.default_rng(4).gamma(2.0, 0.5, 60))
PREVIOUS_THRESHOLD = 4.9  # stands for what the older format's rule set from them


def _manifest(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / MANIFEST).read_text())
    return data


def _write(bundle: Path, data: dict[str, Any]) -> None:
    (bundle / MANIFEST).write_text(json.dumps(data))


def _digests(bundle: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.iterdir())}


def _old_bundle(trained_bundle: Path, tmp_path: Path, version: int) -> Path:
    """The session's bundle as an older format would have written it, with held-out scores
    whose threshold the formats set differently."""
    old = Path(shutil.copytree(trained_bundle, tmp_path / "old"))
    data = _manifest(old)
    data["format_version"] = version
    data["calibration"]["combined_values"] = SHORT_TAIL.tolist()
    data["calibration"]["rule"].update(
        threshold=PREVIOUS_THRESHOLD, method="normal_tail", outliers=0
    )
    _write(old, data)
    return old


@pytest.mark.parametrize("version", [8, 9, 10])
def test_an_older_bundle_is_upgraded_with_its_threshold_set_again(
    trained_bundle: Path, tmp_path: Path, version: int
) -> None:
    old = _old_bundle(trained_bundle, tmp_path, version)
    with pytest.raises(BundleError, match=f"format_version is {version}"):
        load_bundle(old)
    before = _digests(old)
    lighting = _manifest(old)["training"]["lighting"]
    upgrade = upgrade_bundle(old, tmp_path / "new")

    expected = threshold_for_rate(SHORT_TAIL, 0.01)
    assert upgrade.from_format == version and upgrade.held_out == 60
    assert upgrade.previous.threshold == PREVIOUS_THRESHOLD
    assert upgrade.current == expected and expected.threshold != PREVIOUS_THRESHOLD
    # The upgraded bundle loads, passes its self-test and decides with the new threshold.
    scorer = open_scorer(tmp_path / "new", device="cpu")
    assert scorer.manifest.format_version == FORMAT_VERSION
    assert scorer.manifest.calibration.rule == expected
    scored = scorer.score(scorer.bundle.golden.inputs)
    assert scored.threshold == expected.threshold
    np.testing.assert_array_equal(scored.is_anomaly, scored.combined >= expected.threshold)
    # Only the manifest changed; the old bundle is as it was.
    assert _digests(old) == before
    after = _digests(tmp_path / "new")
    assert {n for n in after if after[n] != before[n]} == {MANIFEST}
    training = scorer.manifest.training
    assert "lighting" not in training
    assert training["upgraded"]["from_format_version"] == version
    assert training["upgraded"]["previous_rule"]["threshold"] == PREVIOUS_THRESHOLD
    assert training["upgraded"]["lighting_with_previous_threshold"] == lighting
    assert not (tmp_path / ("new" + PARTIAL_SUFFIX)).exists()


def test_a_format_10_conformal_threshold_above_a_lower_rates_is_lowered(
    trained_bundle: Path, tmp_path: Path
) -> None:
    # 64 held-out scores, the largest high: format 10 set a 3% threshold on that one value (the
    # conformal bound), above its own 1% threshold; format 11 never lets a higher rate get a
    # higher threshold than a lower one.
    rng = np.random.default_rng(5)
    values = np.sort(np.append(rng.standard_normal(63), 3.5))
    assert threshold_for_rate(values, 0.01).threshold < values[-1]
    old = Path(shutil.copytree(trained_bundle, tmp_path / "old"))
    data = _manifest(old)
    data["format_version"] = 10
    data["calibration"]["combined_values"] = values.tolist()
    data["calibration"]["rule"] = {
        "threshold": float(values[-1]),
        "target_false_alarm_rate": 0.03,
        "method": "empirical",
        "outliers": 0,
    }
    _write(old, data)
    upgrade = upgrade_bundle(old, tmp_path / "new")
    assert upgrade.current == threshold_for_rate(values, 0.03)
    assert upgrade.current.method == "normal_tail"
    assert upgrade.current.threshold < threshold_for_rate(values, 0.01).threshold < values[-1]
    rule = load_bundle(tmp_path / "new").manifest.calibration.rule
    assert rule == upgrade.current and rule.target_false_alarm_rate == 0.03


def test_a_threshold_that_does_not_change_keeps_the_lighting_check_in_place(
    trained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session's bundle holds out fewer than TAIL_MIN_VALUES images: no transform, and the
    # formats' thresholds agree.
    old = Path(shutil.copytree(trained_bundle, tmp_path / "old"))
    data = _manifest(old)
    _write(old, {**data, "format_version": 9})
    assert main([str(old), "--out", str(tmp_path / "new")]) == 0
    assert "the same" in capsys.readouterr().out
    upgraded = load_bundle(tmp_path / "new").manifest
    assert upgraded.calibration.rule.threshold == data["calibration"]["rule"]["threshold"]
    assert upgraded.training["lighting"] == data["training"]["lighting"]
    assert "lighting_with_previous_threshold" not in upgraded.training["upgraded"]


@pytest.mark.parametrize(
    ("version", "match"),
    [
        (7, "format_version 7 cannot be upgraded .*train it again"),
        (FORMAT_VERSION, f"already format {FORMAT_VERSION}: nothing to upgrade"),
        ("9", "format_version '9' cannot be upgraded"),
        (True, "format_version True cannot be upgraded"),
        (9.0, "format_version 9.0 cannot be upgraded"),
    ],
)
def test_a_bundle_that_cannot_be_upgraded_is_refused_and_nothing_is_written(
    trained_bundle: Path, tmp_path: Path, version: object, match: str
) -> None:
    old = Path(shutil.copytree(trained_bundle, tmp_path / "old"))
    _write(old, {**_manifest(old), "format_version": version})
    with pytest.raises(BundleError, match=match):
        upgrade_bundle(old, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_rule_that_does_not_follow_from_its_held_out_scores_is_refused(
    trained_bundle: Path, tmp_path: Path
) -> None:
    old = _old_bundle(trained_bundle, tmp_path, 9)
    data = _manifest(old)
    data["calibration"]["rule"]["outliers"] = 3
    _write(old, data)
    with pytest.raises(BundleError, match=r"does not follow from its 60 held-out combined scores"):
        upgrade_bundle(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_bundle_whose_models_fail_their_check_leaves_nothing_behind(
    trained_bundle: Path, tmp_path: Path
) -> None:
    old = _old_bundle(trained_bundle, tmp_path, 9)
    with (old / "decoder.onnx").open("ab") as f:
        f.write(b"\0")
    before = _digests(old)
    with pytest.raises(BundleError, match="the files were changed or corrupted"):
        upgrade_bundle(old, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert _digests(old) == before


def test_what_is_not_a_bundle_directory_or_a_taken_destination_is_refused(
    trained_bundle: Path, tmp_path: Path
) -> None:
    old = _old_bundle(trained_bundle, tmp_path, 9)
    with pytest.raises(BundleError, match="does not exist"):
        upgrade_bundle(tmp_path / "missing", tmp_path / "new")
    archive = Path(shutil.make_archive(str(tmp_path / "bundle"), "gztar", old))
    with pytest.raises(BundleError, match=r"is not a directory: .*unpack an archive first"):
        upgrade_bundle(archive, tmp_path / "new")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        upgrade_bundle(old, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    before = _digests(old)
    with pytest.raises(BundleError, match="is inside"):
        upgrade_bundle(old, old / "new")
    assert _digests(old) == before
    (old / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        upgrade_bundle(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_command_says_what_changed_or_why_not(
    trained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _old_bundle(trained_bundle, tmp_path, 8)
    assert main([str(old), "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    expected = threshold_for_rate(SHORT_TAIL, 0.01).threshold
    assert f"(format 8) to format {FORMAT_VERSION}" in out
    assert f"threshold {PREVIOUS_THRESHOLD:.4f} -> {expected:.4f}" in out
    assert "kept under training.upgraded" in out
    assert main([str(tmp_path / "new"), "--out", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert f"anomaly-upgrade: error: the bundle is already format {FORMAT_VERSION}" in err
