"""fit: the bundle it writes loads and self-tests in the service, and records its choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.bundle import MANIFEST, load_bundle
from service.preprocessing import list_image_files, load_image_file, stack
from service.scorer import Scorer
from service.scoring import SCORE_NAMES
from training.calibrate import WEIGHT_CANDIDATES, window_candidates
from training.config import FitConfig, parse_weights
from training.errors import ConfigError, TrainingError
from training.fit import fit_bundle


def test_bundle_loads_and_self_tests(trained_bundle: Path) -> None:
    scorer = Scorer(load_bundle(trained_bundle), device="cpu")
    scorer.self_test()
    spec = scorer.manifest.input
    assert (spec.height, spec.width, spec.color_mode, spec.scale) == (32, 32, "RGB", 1 / 255)
    assert scorer.manifest.latent_dim == 32


def test_manifest_records_the_fit(trained_bundle: Path) -> None:
    manifest = load_bundle(trained_bundle).manifest
    training = manifest.training
    assert training["config"]["epochs"] == 12
    assert training["model"]["latent_channels"] == 2
    assert training["data"]["n_train"] + training["data"]["n_holdout"] == 24
    assert len(training["data"]["fingerprint"]) == 16
    assert training["training"]["epochs_run"] >= training["training"]["best_epoch"] >= 1
    assert set(training["versions"]) >= {"torch", "onnx", "onnxruntime", "numpy"}
    parity = training["export"]["parity"]
    assert max(parity["max_abs_diff"].values()) <= parity["tolerance"]["atol"] + 1e-3
    decision = training["decision"]
    assert decision["local_window"] in window_candidates(32)
    assert decision["weights"] in [dict(w) for w in WEIGHT_CANDIDATES]
    assert len(decision["candidates"]) == len(WEIGHT_CANDIDATES) * len(window_candidates(32))
    calibration = manifest.calibration
    assert dict(calibration.weights) == decision["weights"]
    assert calibration.local_window == decision["local_window"]
    assert calibration.rule.target_false_alarm_rate == 0.01
    assert np.isfinite(calibration.rule.threshold)


def test_service_scores_held_out_images_as_calibrated(
    trained_bundle: Path, demo_data: Path
) -> None:
    scorer = Scorer(load_bundle(trained_bundle), device="cpu")
    names = scorer.manifest.training["data"]["holdout_files"]
    folder = demo_data / "train" / "good"
    batch = stack([load_image_file(folder / name, scorer.manifest.input) for name in names])
    scored = scorer.score(batch)
    for name in SCORE_NAMES:
        expected = np.sort(scorer.calibration.scores[name].values)
        np.testing.assert_allclose(np.sort(scored.raw[name]), expected, rtol=1e-4)
    # Held-out images are what the threshold was set on: at most the normal-tail share flags.
    assert scored.is_anomaly.mean() <= 0.2


def test_fit_refuses_a_non_empty_output_folder(demo_data: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not empty; pass --overwrite"):
        fit_bundle(demo_data, tmp_path, FitConfig(progress=False))
    with pytest.raises(TrainingError, match="refusing to replace"):
        fit_bundle(demo_data, tmp_path, FitConfig(progress=False), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_no_staging_folders_are_left(trained_bundle: Path) -> None:
    assert [p.name for p in trained_bundle.parent.iterdir()] == [trained_bundle.name]
    assert json.loads((trained_bundle / MANIFEST).read_text())["model_id"]


def test_demo_test_images_are_scored(trained_bundle: Path, demo_data: Path) -> None:
    scorer = Scorer(load_bundle(trained_bundle), device="cpu")
    files = list_image_files(demo_data / "test" / "missing_material")
    scored = scorer.score(stack([load_image_file(p, scorer.manifest.input) for p in files]))
    assert np.all(np.isfinite(scored.combined))
    assert np.all((scored.combined_p_value > 0) & (scored.combined_p_value <= 1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 30}, "image_size has value 30"),
        ({"holdout_fraction": 1.5}, "holdout_fraction"),
        ({"beta": 0.0}, "beta"),
        ({"color_mode": "CMYK"}, "color_mode"),
        ({"target_false_alarm_rate": 0.0}, "target_false_alarm_rate"),
        ({"weights": {"recon": 1.0}}, "weights"),
        ({"corruption": 2.0}, "corruption"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_config_values(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FitConfig(**options)  # type: ignore[arg-type]


def test_parse_weights() -> None:
    assert parse_weights("local_error=1, kl=0.5") == {"local_error": 1.0, "kl": 0.5}
    for bad in ("local_error", "kl=x", "foo=1", "kl=0", "kl=-1"):
        with pytest.raises(ConfigError, match="weights"):
            parse_weights(bad)
