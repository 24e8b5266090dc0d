"""evaluate: metrics on a case with a known answer, the report, and bad data folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.preprocessing import InputSpec, list_image_files, load_image_file, stack
from training.config import FitConfig
from training.errors import DataError
from training.evaluate import evaluate_bundle, run_evaluation
from training.fit import build_bundle
from training.model import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 16
EXPECTED_KEYS = {
    "auroc_recon",
    "auroc_kl",
    "auroc_combined",
    "aupr_combined",
    "f1_at_threshold",
    "fpr_at_threshold",
    "n_normal",
    "n_anomalous",
    "pixel_auroc",
}


def _constant_model() -> VAE:
    """A VAE with every parameter zero: mu = logvar = 0 and a reconstruction of 0.5 everywhere.

    Its scores are then known in closed form: recon_error = mean((x - 0.5)^2), kl = 0.
    """
    model = VAE(VAEConfig(image_size=SIZE, latent_dim=4, width=4, max_width=8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def known_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle of the constant model and a test set whose metrics are known exactly.

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
    config = FitConfig(image_size=SIZE, local_window=4, weights={"recon_error": 1.0})
    bundle = build_bundle(
        _constant_model(), holdout, spec, root / "bundle", config=config, facts={}
    )
    return bundle, root / "data"


def test_metrics_of_the_known_case(known_case: tuple[Path, Path]) -> None:
    bundle, data = known_case
    metrics = evaluate_bundle(bundle, data, device="cpu")
    assert set(metrics) >= EXPECTED_KEYS
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["n_normal"] == 5 and metrics["n_anomalous"] == 3
    assert metrics["auroc_recon"] == 1.0
    assert metrics["auroc_kl"] == 0.5  # kl is 0 for every image: all ties
    assert metrics["auroc_combined"] == 1.0
    assert metrics["aupr_combined"] == 1.0
    assert metrics["f1_at_threshold"] == 1.0
    assert metrics["fpr_at_threshold"] == 0.0
    assert metrics["pixel_auroc"] == 1.0
    assert metrics["auroc_combined_by_type"] == {"hole": 1.0}


def test_scores_are_the_closed_form_ones(known_case: tuple[Path, Path]) -> None:
    bundle, data = known_case
    _, evaluation = run_evaluation(bundle, data, device="cpu")
    expected = np.mean((evaluation.test.images - 0.5) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(evaluation.scores["recon_error"], expected, rtol=1e-5)
    np.testing.assert_array_equal(evaluation.scores["kl"], 0.0)
    hole = evaluation.test.labels
    # local_error with window 4 finds the black square: at least 0.25 * 16 / 16.
    assert np.all(evaluation.scores["local_error"][hole] > 0.2)
    assert np.all(evaluation.scores["local_error"][~hole] < 0.001)


def test_pixel_auroc_is_absent_without_masks(known_case: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = known_case
    copy = tmp_path / "data"
    for path in list_image_files(data / "test", recursive=True):
        target = copy / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert evaluate_bundle(bundle, copy, device="cpu")["pixel_auroc"] is None


def test_report_figures(trained_bundle: Path, demo_data: Path, tmp_path: Path) -> None:
    metrics = evaluate_bundle(trained_bundle, demo_data, report_dir=tmp_path / "report")
    assert metrics["n_normal"] == 6 and metrics["n_anomalous"] == 15
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    for name in ("roc.png", "histograms.png", "cases.png"):
        with Image.open(tmp_path / "report" / name) as figure:
            assert figure.format == "PNG" and figure.width > 300


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
