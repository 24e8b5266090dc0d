"""The command line: help, each command end to end, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.bundle import load_bundle
from tests.training_helpers import one_line_error
from training.cli import main
from training.evaluate import AUROC_KEYS

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = [
    "--image-size",
    "16",
    "--crop-size",
    "16",
    "--coarse-factor",
    "2",
    "--width",
    "4",
    "--max-width",
    "8",
]
TINY += ["--latent-channels", "2", "--head-width", "2", "--batch-size", "4", "--threads", "1"]


def test_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo-data", "fit", "evaluate", "explore", "benchmark", "demo"):
        assert command in result.stdout


def test_fit_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--image-size", "--beta", "--epochs", "--max-steps", "--crop-size"):
        assert option in out
    for option in ("--skip-bad-images", "--seed", "--time-limit", "--aspect", "--head-width"):
        assert option in out
    for removed in ("--latent-dim", "--patience", "--augment"):
        assert removed not in out


def test_demo_data_command(tmp_path: Path) -> None:
    args = [
        "--image-size",
        "32",
        "--n-train",
        "2",
        "--n-test-good",
        "1",
        "--n-test-per-defect",
        "1",
    ]
    assert main(["demo-data", str(tmp_path / "d"), "--seed", "5", *args]) == 0
    assert len(list((tmp_path / "d" / "test").iterdir())) == 6
    assert len(list((tmp_path / "d" / "ground_truth").rglob("*_mask.png"))) == 5


def test_fit_plain_folder_skipping_a_bad_image(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("L", (20, 20), color=100 + i).save(folder / f"part{i}.bmp")
    (folder / "part3.bmp").write_bytes((folder / "part3.bmp").read_bytes()[:50])
    out = tmp_path / "bundle"
    code = main(["fit", str(folder), "--out", str(out), *TINY, "--epochs", "2", "--no-progress",
                 "--skip-bad-images"])  # fmt: skip
    assert code == 0
    manifest = load_bundle(out).manifest
    assert manifest.input.color_mode == "L"
    assert (manifest.input.height, manifest.input.width) == (16, 16)  # 20x20, never enlarged
    assert manifest.training["training"]["steps"] == 2  # 3 training images: one batch a pass
    skipped = manifest.training["data"]["skipped"]
    assert len(skipped) == 1 and skipped[0]["file"].endswith("part3.bmp")


def test_fit_stops_on_a_bad_image_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(8):
        Image.new("RGB", (20, 20)).save(tmp_path / f"{i}.png")
    (tmp_path / "5.png").write_bytes((tmp_path / "5.png").read_bytes()[:40])
    assert main(["fit", str(tmp_path), "--out", str(tmp_path / "b"), *TINY]) == 1
    one_line_error(capsys, "5.png", "--skip-bad-images")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_fit_bad_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "no_images":
        (data / "readme.txt").write_text("nothing to see")
    assert main(["fit", str(data), "--out", str(tmp_path / "b")]) == 1
    message = {"missing": "does not exist", "empty": "is empty", "no_images": "holds no images"}
    one_line_error(capsys, str(data), message[case])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--weights", "foo=1"], "weights"),
        (["--holdout-fraction", "1.5"], "holdout_fraction"),
        (["--image-size", "20"], "image_size"),
        (["--jitter", "0.9"], "jitter"),
        (["--time-limit", "0"], "time_limit"),
        (["--latent-stride", "5"], "latent_stride"),
    ],
)
def test_fit_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    assert main(["fit", str(tmp_path), "--out", str(tmp_path / "b"), *option]) == 1
    one_line_error(capsys, message)


def test_evaluate_prints_one_json_object(
    trained_bundle: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(trained_bundle), str(demo_data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    metrics = json.loads(out)
    for key in (*AUROC_KEYS.values(), "auroc_combined", "aupr_combined", "pixel_auroc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (metrics["n_normal"], metrics["n_anomalous"]) == (6, 15)


@pytest.mark.parametrize("option", [["--aspect", "wide"], ["--device", "gpu"], ["--epochs", "x"]])
def test_fit_bad_choices_are_refused_by_the_parser(tmp_path: Path, option: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", str(tmp_path), "--out", str(tmp_path / "b"), *option])
    assert info.value.code == 2


def test_evaluate_bad_bundle(
    tmp_path: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(tmp_path / "nope"), str(demo_data)]) == 1
    one_line_error(capsys, "does not exist")
