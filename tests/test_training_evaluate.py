"""evaluate: metrics on a case with a known answer, the report, and bad data folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from service.bundle import load_bundle
from service.preprocessing import InputSpec, list_image_files, load_image_file, stack
from service.scoring import POSITION_FLOOR, window_max
from training.config import FitConfig
from training.errors import DataError
from training.evaluate import (
    AUROC_KEYS,
    HELD_OUT_KEYS,
    SHIFT_P_VALUE,
    ScoreShift,
    caught_by_defect_area,
    evaluate_bundle,
    run_evaluation,
    score_shift,
    shift_warning,
)
from training.fit import build_bundle
from training.metrics import auroc
from training.model import VAE, DefectHead, VAEConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 16
EXPECTED_KEYS = {
    *AUROC_KEYS.values(),
    "auroc_combined",
    "aupr_combined",
    "f1_at_threshold",
    "fpr_at_threshold",
    "tpr_at_threshold",
    "best_tpr_at_fpr",
    "at_requested_rate",
    "n_normal",
    "n_anomalous",
    "pixel_auroc",
    "n_masked",
    "auroc_combined_by_type",
    "caught_by_defect_area",
    *HELD_OUT_KEYS,
}
# The defect head of the known model: probability = sigmoid(GAIN * squared error + BIAS).
GAIN, BIAS = 40.0, -5.0
# Each batch norm on the head's path divides by sqrt(1 + eps) (running variance 1).
BN_SCALE = (1 + 1e-5) ** -1.5


def _convolutions(module: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of a block, in order."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _known_model() -> VAE:
    """A VAE whose every output is known in closed form.

    Every convolution is zero and every batch norm is at its initial state, so the encoder gives
    mu = logvar = 0 and the decoder a reconstruction of 0.5 everywhere: recon_error =
    mean((x - 0.5)^2), kl = 0, latent_distance = 0. The defect head passes one path: its first
    convolution averages the squared-error channels it is given, the second and the skip
    connection into the last merge copy that channel, and the output convolution maps it to
    ``GAIN * squared error + BIAS``: the probability map is a sigmoid of the squared error.
    """
    cfg = VAEConfig(
        channels=3,
        width=4,
        max_width=8,
        latent_channels=2,
        head_width=2,
        head_count=1,
        coarse_factor=2,
    )
    model = VAE(cfg)
    assert isinstance(model.head, DefectHead)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        c, w = cfg.channels, cfg.head_width
        first, second = _convolutions(model.head.down[0])
        first.weight[0, 2 * c : 3 * c, 1, 1] = 1.0 / c  # input: image, recon, squared error
        second.weight[0, 0, 1, 1] = 1.0
        (merge,) = _convolutions(model.head.merge[2])
        merge.weight[0, w, 1, 1] = 1.0  # after the w upsampled channels
        model.head.out.weight[0, 0, 0, 0] = GAIN
        assert model.head.out.bias is not None
        model.head.out.bias[0] = BIAS
    return model.eval()


def _expected_map(images: np.ndarray) -> np.ndarray:
    squared = ((images - 0.5) ** 2).mean(axis=1)
    return np.asarray(1.0 / (1.0 + np.exp(-(GAIN * BN_SCALE * squared + BIAS))))


@pytest.fixture(scope="module")
def known_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle of the known model and a test set whose metrics are known exactly.

    Normal images are mid-grey with +-5 levels of noise; anomalous ones are normal images with a
    black 4x4 square (squared error 0.25 there, < 0.0005 anywhere else), masked exactly. The
    test/good images are the held-out images themselves, so none can exceed the normal-tail
    threshold (the largest z-score in a sample of 5 is at most 4 / sqrt(5) < 2.33).
    """
    root = tmp_path_factory.mktemp("known")
    rng = np.random.default_rng(0)
    normal = [rng.integers(123, 134, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)]
    (root / "data" / "test" / "good").mkdir(parents=True)
    (root / "data" / "test" / "hole").mkdir(parents=True)
    (root / "data" / "ground_truth" / "hole").mkdir(parents=True)
    for i, pixels in enumerate(normal):
        Image.fromarray(pixels).save(root / "data" / "test" / "good" / f"{i}.png")
    for i in range(3):
        pixels = normal[i].copy()
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        y, x = 2 + 4 * i, 10 - 3 * i
        pixels[y : y + 4, x : x + 4] = 0
        mask[y : y + 4, x : x + 4] = 255
        Image.fromarray(pixels).save(root / "data" / "test" / "hole" / f"{i}.png")
        Image.fromarray(mask).save(root / "data" / "ground_truth" / "hole" / f"{i}_mask.png")
    spec = InputSpec(height=SIZE, width=SIZE)
    good = list_image_files(root / "data" / "test" / "good")
    holdout = stack([load_image_file(p, spec) for p in good])
    config = FitConfig(
        image_size=SIZE, coarse_factor=2, local_window=1, weights={"local_error": 1.0}
    )
    bundle = build_bundle(
        _known_model(), holdout, holdout, spec, root / "bundle", config=config, facts={}
    )
    return bundle, root / "data"


def test_metrics_of_the_known_case(known_case: tuple[Path, Path]) -> None:
    bundle, data = known_case
    metrics = evaluate_bundle(bundle, data, device="cpu")
    assert set(metrics) >= EXPECTED_KEYS
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["n_normal"] == 5 and metrics["n_anomalous"] == 3
    assert metrics["auroc_recon"] == 1.0
    assert metrics["auroc_local"] == 1.0
    assert metrics["auroc_defect"] == 1.0
    assert metrics["auroc_coarse"] == 1.0
    assert metrics["auroc_kl"] == 0.5  # kl is 0 for every image: all ties
    assert metrics["auroc_latent"] == 0.5  # every posterior mean is the reference's: all ties
    assert metrics["auroc_combined"] == 1.0
    assert metrics["aupr_combined"] == 1.0
    assert metrics["f1_at_threshold"] == 1.0
    assert metrics["fpr_at_threshold"] == 0.0
    assert metrics["tpr_at_threshold"] == 1.0
    # Separated perfectly: some threshold flags every hole and no good part.
    assert metrics["best_tpr_at_fpr"] == {"0.01": 1.0, "0.03": 1.0, "0.05": 1.0}
    # Asking a higher false-alarm rate lowers the threshold (set from the held-out images, as the
    # service sets it per request); the bundle's own rate (1%) gives its own threshold. Here every
    # hole stays above and every good part below (the largest z-score of 5 is < 2).
    at_rate = metrics["at_requested_rate"]
    assert list(at_rate) == ["0.01", "0.03", "0.05"]
    assert at_rate["0.01"]["threshold"] == metrics["threshold"]
    assert (
        at_rate["0.01"]["threshold"] > at_rate["0.03"]["threshold"] > at_rate["0.05"]["threshold"]
    )
    assert all(v["tpr"] == 1.0 and v["fpr"] == 0.0 for v in at_rate.values())
    # The anomaly map is the standardised log local error at each pixel (window 1: the squared
    # error itself), high exactly on the black square.
    assert metrics["pixel_auroc"] == 1.0 and metrics["n_masked"] == 3
    assert metrics["auroc_combined_by_type"] == {"hole": 1.0}
    # Each hole covers 16 of the frame's 256 pixels (6.25%): all three in the 1.6-6.4% class.
    assert metrics["caught_by_defect_area"] == {
        "<0.1%": {"defects": 0, "caught": None},
        "0.1-0.4%": {"defects": 0, "caught": None},
        "0.4-1.6%": {"defects": 0, "caught": None},
        "1.6-6.4%": {"defects": 3, "caught": 1.0},
        ">=6.4%": {"defects": 0, "caught": None},
    }


def test_scores_are_the_closed_form_ones(known_case: tuple[Path, Path]) -> None:
    bundle, data = known_case
    _, evaluation = run_evaluation(bundle, data, device="cpu")
    expected = np.mean((evaluation.test.images - 0.5) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(evaluation.scores["recon_error"], expected, rtol=1e-5)
    np.testing.assert_array_equal(evaluation.scores["kl"], 0.0)
    np.testing.assert_array_equal(evaluation.scores["latent_distance"], 0.0)
    hole = evaluation.test.labels
    images = evaluation.test.images
    # The local, defect and coarse maps are read relative to the mean map of the training images
    # (here the 5 good ones) over the training's lighting range (as they are, and lit darker and
    # brighter by the fit's jitter), plus a floor of POSITION_FLOOR times its image-wide mean.
    jitter = FitConfig().jitter
    lit = np.concatenate([images[~hole] * np.float32(g) for g in (1, 1 - jitter, 1 + jitter)])
    assert lit.max() < 1.0  # mid-grey: nothing clips

    def relative(map_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        mean = map_of(lit).mean(axis=0)
        return np.asarray(map_of(images) / (mean + POSITION_FLOOR * mean.mean()))

    def squared(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.mean((x - 0.5) ** 2, axis=1))

    # local_error with window 1 is the largest relative squared error: 0.25 on the black square,
    # where good parts err by less than 0.0005.
    np.testing.assert_allclose(
        evaluation.scores["local_error"], window_max(relative(squared), 1), rtol=1e-4
    )
    assert np.all(evaluation.scores["local_error"][hole] > 100.0)
    # The defect head's probabilities are a sigmoid of the squared error.
    np.testing.assert_allclose(
        evaluation.scores["defect_probability"], window_max(relative(_expected_map), 1), rtol=1e-4
    )
    # The anomaly map is the combined score at each pixel: here the standardised log relative
    # squared error.
    local = load_bundle(bundle).manifest.calibration.scores["local_error"]
    np.testing.assert_allclose(
        evaluation.maps, local.standardise(relative(squared)), rtol=1e-4, atol=1e-4
    )

    # The zeroed coarse VAE draws 0.5 everywhere: coarse_error is the largest relative squared
    # difference of the 2x2-downsampled image from 0.5 (an 8x8 map, so a window of 1).
    def coarse_squared(x: np.ndarray) -> np.ndarray:
        return squared(x.reshape(-1, 3, SIZE // 2, 2, SIZE // 2, 2).mean(axis=(3, 5)))

    coarse = relative(coarse_squared).max(axis=(1, 2))
    np.testing.assert_allclose(evaluation.scores["coarse_error"], coarse, rtol=1e-4)


def test_pixel_auroc_is_absent_without_masks(known_case: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = known_case
    copy = tmp_path / "data"
    for path in list_image_files(data / "test", recursive=True):
        target = copy / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    metrics = evaluate_bundle(bundle, copy, device="cpu")
    assert metrics["pixel_auroc"] is None and metrics["n_masked"] == 0
    assert metrics["caught_by_defect_area"] is None


def test_defects_are_counted_and_caught_by_their_area() -> None:
    side = 100  # 10,000 pixels: 10 make 0.1% of the frame

    def mask(pixels: int) -> np.ndarray:
        m = np.zeros((side, side), dtype=bool)
        m.flat[:pixels] = True
        return m

    # (area in pixels, defective, flagged); a class's lower edge belongs to it.
    cases = [
        (0, False, True),  # a good image flagged: not a defect, whatever its verdict
        (9, True, False),  # 0.09%
        (10, True, True),  # 0.1%
        (39, True, False),  # 0.39%
        (160, True, True),  # 1.6%
        (639, True, True),  # 6.39%
        (640, True, False),  # 6.4%
        (5000, True, True),  # 50%
    ]
    masks = tuple(mask(area) for area, _, _ in cases)
    labels = np.array([bad for _, bad, _ in cases])
    flagged = np.array([f for _, _, f in cases])
    assert caught_by_defect_area(masks, labels, flagged) == {
        "<0.1%": {"defects": 1, "caught": 0.0},
        "0.1-0.4%": {"defects": 2, "caught": 0.5},
        "0.4-1.6%": {"defects": 0, "caught": None},
        "1.6-6.4%": {"defects": 2, "caught": 1.0},
        ">=6.4%": {"defects": 2, "caught": 0.5},
    }
    # A defective image without a mask has no area: it is left out, and without any masked
    # defect there is nothing to tell.
    unmasked = caught_by_defect_area((masks[0], None, *masks[2:]), labels, flagged)
    assert unmasked is not None and unmasked["<0.1%"] == {"defects": 0, "caught": None}
    nothing = tuple(None for _ in cases)
    assert caught_by_defect_area(nothing, labels, flagged) is None


def _copy_of(data: Path, target: Path) -> Path:
    for path in data.rglob("*.png"):
        (target / path.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
        (target / path.relative_to(data)).write_bytes(path.read_bytes())
    return target


def test_masks_named_as_their_image_are_found_in_any_format(
    known_case: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, data = known_case
    copy = _copy_of(data, tmp_path / "data")
    masks = copy / "ground_truth" / "hole"
    for mask in sorted(masks.iterdir()):
        with Image.open(mask) as image:
            image.save(masks / (mask.name.removesuffix("_mask.png") + ".bmp"))
        mask.unlink()
    metrics = evaluate_bundle(bundle, copy, device="cpu")
    assert metrics["pixel_auroc"] == 1.0 and metrics["n_masked"] == 3


def test_defective_images_without_a_mask_are_counted_and_said(
    known_case: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, data = known_case
    copy = _copy_of(data, tmp_path / "data")
    (copy / "ground_truth" / "hole" / "1_mask.png").unlink()
    with caplog.at_level("WARNING", logger="training.evaluate"):
        metrics = evaluate_bundle(bundle, copy, device="cpu")
    assert metrics["n_masked"] == 2 and metrics["pixel_auroc"] == 1.0
    assert "1 of 3 defective test images have no mask" in caplog.text
    assert "hole: 1" in caplog.text and "reads the others only" in caplog.text


def test_two_masks_of_one_image_are_refused(known_case: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = known_case
    copy = _copy_of(data, tmp_path / "data")
    masks = copy / "ground_truth" / "hole"
    (masks / "0_mask.bmp").write_bytes((masks / "0_mask.png").read_bytes())
    with pytest.raises(DataError, match="two masks named 0_mask"):
        evaluate_bundle(bundle, copy, device="cpu")


def test_report_figures(trained_bundle: Path, demo_data: Path, tmp_path: Path) -> None:
    metrics = evaluate_bundle(trained_bundle, demo_data, report_dir=tmp_path / "report")
    assert metrics["n_normal"] == 6 and metrics["n_anomalous"] == 15
    assert metrics["test_copies_of_training"] == 0
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    for name in ("roc.png", "histograms.png", "cases.png"):
        with Image.open(tmp_path / "report" / name) as figure:
            assert figure.format == "PNG" and figure.width > 300


def test_test_images_that_are_copies_of_training_images_are_counted_and_said(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _copy_of(demo_data, tmp_path / "data")
    first, second = list_image_files(data / "train" / "good")[:2]
    (data / "test" / "good" / "copied.png").write_bytes(first.read_bytes())
    # The second part photographed again: a few grey levels of noise.
    pixels = np.asarray(Image.open(second), dtype=np.float64)
    pixels += np.random.default_rng(0).normal(0.0, 3.0, pixels.shape)
    retaken = np.clip(pixels, 0, 255).round().astype(np.uint8)
    Image.fromarray(retaken).save(data / "test" / "scratch" / "retaken.png")
    with caplog.at_level("WARNING", logger="training.evaluate"):
        metrics = evaluate_bundle(trained_bundle, data, device="cpu")
    assert metrics["test_copies_of_training"] == 2
    assert "2 test images are copies or near-copies of training images" in caplog.text
    assert f"test/good/copied.png of train/good/{first.name}" in caplog.text


def test_without_a_training_folder_test_images_are_not_compared(
    known_case: tuple[Path, Path],
) -> None:
    bundle, data = known_case
    assert not (data / "train").exists()
    metrics = evaluate_bundle(bundle, data, device="cpu")
    assert metrics["test_copies_of_training"] is None
    assert [metrics[key] for key in HELD_OUT_KEYS] == [None, None, None]


def test_test_folder_missing(trained_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no test folder"):
        evaluate_bundle(trained_bundle, tmp_path)


def test_test_folder_without_anomalies(
    trained_bundle: Path, demo_data: Path, tmp_path: Path
) -> None:
    good = tmp_path / "test" / "good"
    good.mkdir(parents=True)
    for path in list_image_files(demo_data / "test" / "good"):
        (good / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="evaluation needs both"):
        evaluate_bundle(trained_bundle, tmp_path)


def test_unreadable_test_image(trained_bundle: Path, demo_data: Path, tmp_path: Path) -> None:
    for kind in ("good", "scratch"):
        (tmp_path / "test" / kind).mkdir(parents=True)
        for path in list_image_files(demo_data / "test" / kind):
            (tmp_path / "test" / kind / path.name).write_bytes(path.read_bytes())
    (tmp_path / "test" / "scratch" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"broken\.png"):
        evaluate_bundle(trained_bundle, tmp_path)


def _held_out_files(bundle: Path, data: Path) -> list[Path]:
    names = load_bundle(bundle).manifest.training["data"]["holdout_files"]
    return [data / "train" / "good" / name for name in names]


def _with_test_good(data: Path, target: Path, images: dict[str, np.ndarray]) -> Path:
    """A copy of ``data`` whose test/good holds ``images`` (8-bit arrays) instead of its own."""
    copy = _copy_of(data, target)
    for path in list_image_files(copy / "test" / "good"):
        path.unlink()
    for name, pixels in images.items():
        Image.fromarray(pixels).save(copy / "test" / "good" / name)
    return copy


def test_the_test_split_is_read_against_the_fits_held_out_images(
    trained_bundle: Path, demo_data: Path
) -> None:
    scorer, evaluation = run_evaluation(trained_bundle, demo_data, device="cpu")
    held_out = _held_out_files(trained_bundle, demo_data)
    assert evaluation.metrics["n_held_out_good"] == len(held_out) == 5
    spec = scorer.manifest.input
    reference = scorer.score(stack([load_image_file(p, spec) for p in held_out])).combined
    combined, labels = evaluation.scores["combined"], evaluation.test.labels

    def against_held_out(scores: np.ndarray) -> float:
        both = np.r_[scores, reference]
        return round(auroc(both, np.r_[np.ones(scores.size), np.zeros(reference.size)]), 4)

    assert evaluation.metrics["auroc_defects_vs_held_out"] == against_held_out(combined[labels])
    assert evaluation.metrics["auroc_test_good_vs_held_out"] == against_held_out(combined[~labels])


def test_good_test_images_like_the_held_out_ones_are_not_said_to_differ(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held_out = _held_out_files(trained_bundle, demo_data)
    copy = _with_test_good(
        demo_data,
        tmp_path / "data",
        {f"again_{p.name}": np.asarray(Image.open(p)) for p in held_out},
    )
    with caplog.at_level("WARNING", logger="training.evaluate"):
        metrics = evaluate_bundle(trained_bundle, copy, device="cpu")
    # The same five images on both sides: only the pairs of an image with itself can differ
    # (in the last bits, scored in other batches), 5 of 25.
    assert 0.4 <= metrics["auroc_test_good_vs_held_out"] <= 0.6
    assert "the test split's good images score" not in caplog.text


def test_good_test_images_unlike_the_held_out_ones_are_said_to_differ(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The held-out parts photographed in six darker lights: thirty good images, none like the
    # images the model was fitted on.
    held_out = _held_out_files(trained_bundle, demo_data)
    darker = {
        f"{gain:.2f}_{p.name}": (np.asarray(Image.open(p), dtype=np.float64) * gain).astype(
            np.uint8
        )
        for gain in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55)
        for p in held_out
    }
    copy = _with_test_good(demo_data, tmp_path / "data", darker)
    with caplog.at_level("WARNING", logger="training.evaluate"):
        metrics = evaluate_bundle(trained_bundle, copy, device="cpu")
    assert metrics["n_normal"] == 30
    assert metrics["auroc_test_good_vs_held_out"] == 1.0
    assert "the test split's good images score higher than the held-out good images" in (
        caplog.text
    )
    assert "AUROC 1.00 against them" in caplog.text


def test_another_training_folder_is_not_read_as_the_fits(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = _copy_of(demo_data, tmp_path / "data")
    first = list_image_files(copy / "train" / "good")[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(first)
    with caplog.at_level("INFO", logger="training.evaluate"):
        metrics = evaluate_bundle(trained_bundle, copy, device="cpu")
    assert [metrics[key] for key in HELD_OUT_KEYS] == [None, None, None]
    assert "train/good is not the folder this bundle was fitted on" in caplog.text
    assert metrics["test_copies_of_training"] == 0


def test_a_score_shift_and_its_warning() -> None:
    higher = score_shift(np.arange(10.0, 30.0), np.arange(0.0, 10.0))
    assert higher.auroc == 1.0 and higher.p_value < SHIFT_P_VALUE
    assert "score higher than" in (shift_warning(higher) or "")
    lower = score_shift(np.arange(0.0, 10.0), np.arange(10.0, 30.0))
    assert lower.auroc == 0.0 and "score lower than" in (shift_warning(lower) or "")
    alike = score_shift(np.arange(0.0, 20.0, 2.0), np.arange(1.0, 21.0, 2.0))
    assert alike.auroc == 0.45 and alike.p_value > 0.5 and shift_warning(alike) is None
    assert score_shift(np.ones(4), np.ones(6)) == ScoreShift(0.5, 1.0)
    # At the bound the images are still said to score alike.
    assert shift_warning(ScoreShift(0.9, SHIFT_P_VALUE)) is None
