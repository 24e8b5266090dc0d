"""Calibrating a bundle again on good images from the line (service/recalibrate.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.bundle import LATENT_REFERENCE, MANIFEST, BundleError, load_bundle
from service.bundle_copy import PARTIAL_SUFFIX
from service.preprocessing import list_image_files, load_image_file, stack
from service.recalibrate import (
    ADVISED_IMAGES,
    MIN_IMAGES,
    RecalibrationError,
    main,
    recalibrate_bundle,
)
from service.runtime import open_scorer
from service.scoring import LatentBaseline
from training.demo_data import generate_demo_dataset

# Good parts of the demo's kind that the session's bundle never saw (another seed).
NEW_GOOD = 40


def _digests(bundle: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.iterdir())}


@pytest.fixture(scope="module")
def line_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good parts photographed on the line since the fit: a folder of new good images."""
    root = tmp_path_factory.mktemp("line")
    generate_demo_dataset(
        root / "data", seed=7, image_size=64, n_train=2 * NEW_GOOD, n_test_good=1,
        n_test_per_defect=1,
    )  # fmt: skip
    return root / "data" / "train" / "good"


def _relit(images: list[Path], folder: Path, gain: float) -> Path:
    folder.mkdir(parents=True)
    for path in images:
        pixels = np.asarray(Image.open(path), dtype=np.float64) * gain
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(folder / path.name)
    return folder


def _flagged(bundle: Path, folder: Path) -> float:
    scorer = open_scorer(bundle, device="cpu", threads=1)
    images = stack([load_image_file(p, scorer.manifest.input) for p in list_image_files(folder)])
    return float(np.mean(scorer.score(images).is_anomaly))


def test_a_recalibrated_bundle_is_calibrated_on_the_new_images_and_nothing_else_changes(
    trained_bundle: Path, line_images: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for path in list_image_files(line_images)[:NEW_GOOD]:
        shutil.copy(path, good)
    before = _digests(trained_bundle)
    out = tmp_path / "recalibrated"
    result = recalibrate_bundle(trained_bundle, good, out, device="cpu", now="2026-12-06T23:00")
    assert _digests(trained_bundle) == before
    assert not out.with_name(out.name + PARTIAL_SUFFIX).exists()
    after = _digests(out)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {MANIFEST, LATENT_REFERENCE}
    old, new = load_bundle(trained_bundle), load_bundle(out)
    assert result.images == NEW_GOOD and result.skipped == ()
    assert new.manifest.model_id != old.manifest.model_id
    # The latent reference stays; the drift baseline is now the new images'.
    np.testing.assert_array_equal(new.latent_reference.precision, old.latent_reference.precision)
    assert new.latent_baseline.count == NEW_GOOD
    # The calibration holds exactly the combined scores the new bundle gives these images, and
    # its threshold keeps the bundle's own false-alarm rate.
    scorer = open_scorer(out, device="cpu", threads=1)
    images = stack([load_image_file(p, scorer.manifest.input) for p in list_image_files(good)])
    scored = scorer.score(images)
    # (in batches of other sizes than the recalibration's: equal to float precision)
    np.testing.assert_allclose(
        new.manifest.calibration.combined.values, np.sort(scored.combined), rtol=1e-6
    )
    _, _, mu = scorer.raw_scores(images)
    baseline = LatentBaseline.fit(mu)
    # (gathered a batch of 32 at a time, then the last 8)
    np.testing.assert_allclose(new.latent_baseline.mean, baseline.mean, rtol=1e-9)
    np.testing.assert_allclose(new.latent_baseline.std, baseline.std, rtol=1e-6)
    rule, previous = new.manifest.calibration.rule, old.manifest.calibration.rule
    assert rule == result.current and previous == result.previous
    assert rule.target_false_alarm_rate == previous.target_false_alarm_rate
    assert new.manifest.calibration.weights == old.manifest.calibration.weights
    assert result.flagged == float(np.mean(scored.is_anomaly))
    record = new.manifest.training["recalibrations"]
    assert len(record) == 1 and record[0]["at"] == "2026-12-06T23:00"
    assert record[0]["images"] == NEW_GOOD and record[0]["folder"] == str(good.resolve())
    assert record[0]["previous_model_id"] == old.manifest.model_id
    assert record[0]["previous_rule"]["threshold"] == previous.threshold
    # The fit's lighting check was measured with the previous threshold.
    assert "lighting" not in new.manifest.training
    assert record[0]["lighting_with_previous_calibration"] == old.manifest.training["lighting"]
    # A second recalibration keeps the first one's record.
    again = recalibrate_bundle(out, good, tmp_path / "again", device="cpu")
    assert again.previous == rule
    assert len(load_bundle(tmp_path / "again").manifest.training["recalibrations"]) == 2


def test_after_a_change_of_light_recalibrating_restores_the_false_alarm_rate(
    trained_bundle: Path, line_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The line's lamp now gives 40% less light: half the new images calibrate, the other half
    # stand for the parts that follow.
    images = list_image_files(line_images)
    calibrating = _relit(images[:NEW_GOOD], tmp_path / "calibrating", 0.6)
    following = _relit(images[NEW_GOOD:], tmp_path / "following", 0.6)
    out = tmp_path / "recalibrated"
    assert main([str(trained_bundle), str(calibrating), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    before, after = _flagged(trained_bundle, following), _flagged(out, following)
    assert before >= 0.5
    assert after <= 0.1
    assert f"recalibrated {trained_bundle} on {NEW_GOOD} good images" in printed.out
    assert "put it where the service's --bundle points" in printed.out
    # Most of them were flagged by the old threshold: the operator is asked to check them.
    assert "check that they are all good parts" in printed.err


def test_the_training_folder_or_a_copy_of_it_is_refused(
    trained_bundle: Path, demo_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(RecalibrationError, match="holds the images this bundle was trained on"):
        recalibrate_bundle(trained_bundle, demo_data / "train" / "good", tmp_path / "a")
    copy = shutil.copytree(demo_data / "train" / "good", tmp_path / "copy")
    with pytest.raises(RecalibrationError, match=r"trained on \(a copy of them\): they score"):
        recalibrate_bundle(trained_bundle, copy, tmp_path / "b", device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / ("b" + PARTIAL_SUFFIX)).exists()


def test_fewer_images_than_advised_are_used_with_a_warning(
    trained_bundle: Path, line_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for path in list_image_files(line_images)[:MIN_IMAGES]:
        shutil.copy(path, few / path.name)
    out = tmp_path / "recalibrated"
    assert main([str(trained_bundle), str(few), "--out", str(out), "--device", "cpu"]) == 0
    assert f"{MIN_IMAGES} good images set a loose threshold" in capsys.readouterr().err
    assert load_bundle(out).manifest.training["recalibrations"][-1]["images"] == MIN_IMAGES
    # From the advised count on, no such warning.
    enough = tmp_path / "enough"
    enough.mkdir()
    for path in list_image_files(line_images)[:ADVISED_IMAGES]:
        shutil.copy(path, enough / path.name)
    assert (
        main([str(trained_bundle), str(enough), "--out", str(tmp_path / "o2"), "--device", "cpu"])
        == 0
    )
    assert "loose threshold" not in capsys.readouterr().err


def test_too_few_images_are_refused(
    trained_bundle: Path, line_images: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for path in list_image_files(line_images)[: MIN_IMAGES - 1]:
        shutil.copy(path, good)
    with pytest.raises(RecalibrationError, match=f"{MIN_IMAGES - 1} readable good images"):
        recalibrate_bundle(trained_bundle, good, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_fails_unless_skipped(
    trained_bundle: Path, line_images: Path, tmp_path: Path
) -> None:
    good = shutil.copytree(line_images, tmp_path / "good")
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(RecalibrationError, match=r"broken\.png.*--skip-bad-images"):
        recalibrate_bundle(trained_bundle, good, tmp_path / "out", device="cpu")
    result = recalibrate_bundle(trained_bundle, good, tmp_path / "out", device="cpu", skip_bad=True)
    assert result.images == 2 * NEW_GOOD
    assert [name for name, _ in result.skipped] == ["broken.png"]
    skipped = load_bundle(tmp_path / "out").manifest.training["recalibrations"][0]["skipped"]
    assert [entry["file"] for entry in skipped] == ["broken.png"]


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "holds no images directly"),
    ],
)
def test_a_folder_without_images_is_refused(
    trained_bundle: Path, tmp_path: Path, arrange: object, message: str
) -> None:
    folder = arrange(tmp_path)  # type: ignore[operator]
    with pytest.raises(RecalibrationError, match=message):
        recalibrate_bundle(trained_bundle, folder, tmp_path / "out", device="cpu")


def test_the_command_line_says_what_is_wrong(
    trained_bundle: Path, line_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main([str(trained_bundle), str(line_images), "--out", str(taken)]) == 1
    assert "anomaly-recalibrate: error:" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(line_images), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(BundleError, match="inside"):
        recalibrate_bundle(trained_bundle, line_images, trained_bundle / "new")
