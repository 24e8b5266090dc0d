"""fit: the bundle it writes loads and self-tests in the service, and records its choices."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import training.calibrate
import training.export
import training.fit
from service.bundle import ERROR_ARRAYS, FORMAT_VERSION, MANIFEST, Bundle, load_bundle
from service.preprocessing import list_image_files, load_image_file, stack
from service.runtime import OnnxGraphs, Scorer
from service.scoring import SCORE_NAMES, ErrorReference, LatentGrid, LatentReference, ModelOutputs
from tests.conftest import DEMO_SIZE, TINY_FIT
from training.calibrate import DEFAULT_WEIGHTS, LightingCheck, default_window
from training.config import FitConfig
from training.data import evenly_spaced
from training.errors import ConfigError, TrainingError
from training.fit import GOLDEN_IMAGES, fit_bundle

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_bundle_loads_and_self_tests(trained_bundle: Path) -> None:
    scorer = Scorer(load_bundle(trained_bundle), device="cpu")
    scorer.self_test()
    spec = scorer.manifest.input
    assert (spec.height, spec.width, spec.color_mode, spec.scale) == (32, 32, "RGB", 1 / 255)
    assert scorer.manifest.format_version == FORMAT_VERSION == 11
    assert scorer.manifest.latent == LatentGrid(channels=2, rows=4, columns=4)
    assert scorer.manifest.latent_dim == 32
    golden = scorer.bundle.golden
    assert golden.defect_map.shape == (golden.inputs.shape[0], 32, 32)
    # The coarse VAE sees the 32x32 input downsampled by 4.
    assert (
        golden.coarse_input.shape == golden.coarse_recon.shape == (golden.inputs.shape[0], 3, 8, 8)
    )


def test_manifest_records_the_fit(trained_bundle: Path) -> None:
    manifest = load_bundle(trained_bundle).manifest
    training = manifest.training
    assert training["config"] == FitConfig(**TINY_FIT).to_dict()
    assert training["model"]["latent_channels"] == 2 and training["model"]["head_width"] == 4
    data = training["data"]
    assert data["n_train"] + data["n_holdout"] == DEMO_SIZE["n_train"]
    assert len(data["fingerprint"]) == 16
    run = training["training"]
    steps = FitConfig(**TINY_FIT).steps_for(data["n_train"])
    assert run["steps"] == run["planned_steps"] == steps == 20
    assert run["stop_reason"] == "completed 20 steps"
    assert run["history"][-1]["step"] == 20 and run["final"]["step"] == 20
    coarse = training["coarse_training"]
    assert coarse["steps"] == coarse["planned_steps"] == 20
    assert run["precision"] == coarse["precision"] == "fp32"
    assert coarse["stop_reason"] == "completed 20 steps"
    assert training["model"]["coarse_factor"] == 4
    assert set(training["versions"]) >= {"torch", "onnx", "onnxruntime", "numpy"}
    # The kernels behind the weights: another instruction set trains other weights.
    assert training["device_trained_on"] == "cpu"
    assert training["device_kernels"] == torch.backends.cpu.get_cpu_capability() != ""
    parity = training["export"]["parity"]
    assert max(parity["max_abs_diff"].values()) <= parity["tolerance"]["atol"] + 1e-3
    assert set(parity["max_abs_diff"]) == {
        "mu",
        "logvar",
        "recon",
        "defect_map",
        "coarse_input",
        "coarse_recon",
    }
    decision = training["decision"]
    assert decision["local_window"] == default_window(32, 32)
    assert decision["weights"] == dict(DEFAULT_WEIGHTS)
    assert 0.0 <= decision["synthetic_auroc"] <= 1.0
    lighting = training["lighting"]
    assert lighting["change"] == FitConfig(**TINY_FIT).jitter
    for key in ("flagged", "flagged_darker", "flagged_brighter"):
        assert 0.0 <= lighting[key] <= 1.0, key
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


def test_the_latent_and_error_references_are_fitted_on_the_training_images(
    trained_bundle: Path,
) -> None:
    bundle = load_bundle(trained_bundle)
    assert bundle.manifest.training["subsets"]["reference_images"] == len(training_files(bundle))
    assert_references_fitted_on(bundle, slice(None))


def training_files(bundle: Bundle) -> list[Path]:
    """The bundle's training images (the folder's good images less those it held out)."""
    held_out = set(bundle.manifest.training["data"]["holdout_files"])
    folder = Path(bundle.manifest.training["data"]["folder"])
    train = [p for p in list_image_files(folder) if p.name not in held_out]
    assert len(train) == bundle.manifest.training["data"]["n_train"]
    return train


def assert_references_fitted_on(bundle: Bundle, rows: slice) -> None:
    """The bundle's references are those of these rows of its training images."""
    scorer = Scorer(bundle, device="cpu")
    train = training_files(bundle)
    as_they_are = stack([load_image_file(p, bundle.manifest.input) for p in train])[rows]
    # Over the lighting range the training called normal: as they are, darker and brighter.
    jitter = bundle.manifest.training["config"]["jitter"]
    assert jitter > 0
    images = np.concatenate(
        [np.clip(as_they_are * np.float32(gain), 0.0, 1.0) for gain in (1, 1 - jitter, 1 + jitter)]
    ).astype(np.float32)
    out = scorer.run_model(images)
    expected = LatentReference.fit(out.mu, bundle.manifest.latent)
    np.testing.assert_allclose(bundle.latent_reference.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(
        bundle.latent_reference.precision, expected.precision, rtol=1e-3, atol=1e-3
    )
    # And the error reference: the training images' mean error maps, none of the held-out ones.
    errors = ErrorReference.fit(images, out)
    for name in ERROR_ARRAYS:
        np.testing.assert_allclose(
            getattr(bundle.error_reference, name), getattr(errors, name), rtol=1e-4, atol=1e-7
        )


@pytest.mark.parametrize(
    ("image_size", "coarse_factor", "input_size", "coarse_size"),
    [(32, 2, (16, 32), (8, 16)), (64, 8, (32, 64), (4, 8))],
    ids=["coarse-factor-2", "coarse-factor-8-padded"],
)
def test_a_fit_on_non_square_images_keeps_their_aspect_ratio(
    demo_data: Path,
    tmp_path: Path,
    image_size: int,
    coarse_factor: int,
    input_size: tuple[int, int],
    coarse_size: tuple[int, int],
) -> None:
    # The demo flanges cut to 64 wide, 48 high: the input stays wider than high, in sides of
    # multiples of 16 at a coarse factor of 2 (about 32x32 pixels: 16x32). At a factor of 8 a
    # coarse cell is 64 input pixels, but sides stay multiples of 32 (about 64x64 pixels: 32x64,
    # as at a factor of 4): the coarse VAE's 4x8 input is padded to whole cells.
    folder = tmp_path / "wide"
    folder.mkdir()
    for path in list_image_files(demo_data / "train" / "good")[:12]:
        with Image.open(path) as image:
            image.crop((0, 8, 64, 56)).save(folder / path.name)
    options = {**TINY_FIT, "image_size": image_size, "max_steps": 4, "coarse_factor": coarse_factor}
    bundle_dir = fit_bundle(folder, tmp_path / "bundle", FitConfig(**options))
    scorer = Scorer(load_bundle(bundle_dir), device="cpu")
    scorer.self_test()
    manifest = scorer.manifest
    assert manifest.training["model"]["coarse_factor"] == coarse_factor
    assert (manifest.input.height, manifest.input.width) == input_size
    rows, columns = input_size[0] // 8, input_size[1] // 8
    assert manifest.latent == LatentGrid(channels=2, rows=rows, columns=columns)
    assert scorer.bundle.golden.coarse_input.shape[2:] == coarse_size
    assert scorer.bundle.golden.coarse_recon.shape[2:] == coarse_size
    assert manifest.training["training"]["steps"] == 4
    images = stack([load_image_file(p, manifest.input) for p in sorted(folder.iterdir())])
    scored = scorer.score(images, keep_maps=True)
    assert scored.anomaly_map is not None and scored.anomaly_map.shape == (12, *input_size)
    assert all(np.all(np.isfinite(scored.raw[name])) for name in SCORE_NAMES)


def test_a_fit_without_jitter_has_no_lighting_check(demo_data: Path, tmp_path: Path) -> None:
    # Without jitter no lighting change is called normal, so there is nothing to check against.
    config = FitConfig(**{**TINY_FIT, "jitter": 0.0, "max_steps": 2})
    bundle_dir = fit_bundle(demo_data, tmp_path / "bundle", config)
    assert load_bundle(bundle_dir).manifest.training["lighting"] is None


def test_the_fit_log_warns_of_light_that_flags_many_good_images(
    demo_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    check = LightingCheck(change=0.1, flagged=0.0, flagged_darker=0.0, flagged_brighter=0.4)
    monkeypatch.setattr(training.fit, "lighting_check", lambda *args, **kwargs: check)
    with caplog.at_level(logging.INFO, logger="training.fit"):
        fit_bundle(demo_data, tmp_path / "bundle", FitConfig(**{**TINY_FIT, "max_steps": 2}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("lit 10% brighter, 40.0% of the held-out good") for w in warnings)
    assert load_bundle(tmp_path / "bundle").manifest.training["lighting"] == check.to_dict()


def test_copies_in_the_good_folder_stay_with_their_originals_and_the_log_says_so(
    demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each good image copied under another name (every other one photographed again, with a
    # few grey levels of noise): no held-out image may be one trained on, or nearly.
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    originals = list_image_files(demo_data / "train" / "good")
    noise = np.random.default_rng(0)
    for i, path in enumerate(originals):
        (good / path.name).write_bytes(path.read_bytes())
        if i % 2:
            pixels = np.asarray(Image.open(path), dtype=np.float64)
            pixels += noise.normal(0.0, 3.0, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(
                good / f"copy-{path.name}"
            )
        else:
            (good / f"copy-{path.name}").write_bytes(path.read_bytes())
    with caplog.at_level(logging.INFO, logger="training.fit"):
        bundle_dir = fit_bundle(
            tmp_path / "data", tmp_path / "bundle", FitConfig(**{**TINY_FIT, "max_steps": 2})
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"{len(originals)} images are copies of others") for w in warnings)
    data = load_bundle(bundle_dir).manifest.training["data"]
    assert data["copies"] == len(originals) and data["n_images"] == 2 * len(originals)
    held = set(data["holdout_files"])
    # Every held-out image with its copy, or its original: whole pairs.
    bases = {name.removeprefix("copy-") for name in held}
    assert held and held == bases | {f"copy-{name}" for name in bases}


def test_a_fit_runs_the_graphs_a_bounded_batch_at_a_time(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder of thousands of good images must not reach ONNX Runtime (or memory) at once:
    # with batches of 2 and parity on 4 images (checked in batches of 3), no graph run may see
    # more than the GOLDEN_IMAGES of the golden vectors, 4, fewer than the held-out images.
    for module in (training.calibrate, training.fit):
        monkeypatch.setattr(module, "SCORING_BATCH", 2)
    monkeypatch.setattr(training.export, "PARITY_EXAMPLES", 4)
    seen: list[int] = []
    run = OnnxGraphs.run

    def recording(self: OnnxGraphs, batch: np.ndarray) -> ModelOutputs:
        seen.append(batch.shape[0])
        return run(self, batch)

    monkeypatch.setattr(OnnxGraphs, "run", recording)
    config = FitConfig(**{**TINY_FIT, "max_steps": 2})
    bundle_dir = fit_bundle(demo_data, tmp_path / "bundle", config)
    held_out = load_bundle(bundle_dir).manifest.training["data"]["n_holdout"]
    assert held_out > GOLDEN_IMAGES == 4
    assert seen and max(seen) <= GOLDEN_IMAGES


def test_a_large_folder_fits_its_references_and_checks_on_seeded_subsets(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thousands of good images must not make the fit's work beyond the training grow with them:
    # past REFERENCE_IMAGES training images and CHECK_IMAGES held-out ones, the references, the
    # training's validation and the checks read evenly spaced ones; calibration reads them all.
    monkeypatch.setattr(training.fit, "REFERENCE_IMAGES", 7)
    monkeypatch.setattr(training.fit, "CHECK_IMAGES", 3)
    seen: dict[str, list[tuple[int, str]]] = {}

    def recording(name: str, function: Callable[..., Any], position: int) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            images = args[position]
            seen.setdefault(name, []).append((images.shape[0], images.dtype.name))
            return function(*args, **kwargs)

        return wrapper

    for name, position in (
        ("train_both", 2),
        ("fit_references", 1),
        ("score_held_out", 1),
        ("choose_rule", 3),
        ("lighting_check", 3),
    ):
        monkeypatch.setattr(
            training.fit, name, recording(name, getattr(training.fit, name), position)
        )
    config = FitConfig(**{**TINY_FIT, "max_steps": 2})
    bundle = load_bundle(fit_bundle(demo_data, tmp_path / "bundle", config))
    data = bundle.manifest.training["data"]
    assert data["n_train"] > 7 and data["n_holdout"] > 3
    referenced = len(range(data["n_train"])[evenly_spaced(data["n_train"], 7)])
    checked = len(range(data["n_holdout"])[evenly_spaced(data["n_holdout"], 3)])
    assert 4 <= referenced <= 7 and 2 <= checked <= 3
    assert bundle.manifest.training["subsets"] == {
        "reference_images": referenced,
        "check_images": checked,
        "of_training": data["n_train"],
        "of_held_out": data["n_holdout"],
    }
    # The references and the held-out pass read the 8-bit samples, a batch at a time; only the
    # checked subset is ever model input as a whole.
    assert seen == {
        "train_both": [(checked, "float32")],
        "fit_references": [(referenced, "uint8")],
        "score_held_out": [(data["n_holdout"], "uint8")],
        "choose_rule": [(checked, "float32")],
        "lighting_check": [(checked, "float32")],
    }
    assert_references_fitted_on(bundle, evenly_spaced(data["n_train"], 7))


def test_head_width_zero_is_refused_up_front_or_fits(demo_data: Path, tmp_path: Path) -> None:
    """``--head-width 0`` ("no defect head") either is refused as an option, before any
    training, or gives a bundle: never a whole training that export then refuses."""
    try:
        config = FitConfig(**{**TINY_FIT, "head_width": 0, "max_steps": 2})
    except ConfigError as exc:
        assert "head_width" in str(exc)
        return
    bundle_dir = fit_bundle(demo_data, tmp_path / "bundle", config)
    Scorer(load_bundle(bundle_dir), device="cpu").self_test()


@pytest.mark.parametrize("head_count", [1, 2])
def test_a_fit_with_one_head_or_several_writes_a_bundle_that_serves(
    demo_data: Path, tmp_path: Path, head_count: int
) -> None:
    config = FitConfig(**{**TINY_FIT, "head_count": head_count, "max_steps": 4})
    bundle = load_bundle(fit_bundle(demo_data, tmp_path / "bundle", config))
    assert bundle.manifest.training["model"]["head_count"] == head_count
    scorer = Scorer(bundle, device="cpu")
    scorer.self_test()
    images = stack(
        [
            load_image_file(p, bundle.manifest.input)
            for p in list_image_files(demo_data / "test" / "good")
        ]
    )
    maps = scorer.graphs.run(images).defect_map
    assert maps.shape == (images.shape[0], 32, 32) and 0 <= maps.min() <= maps.max() <= 1


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
