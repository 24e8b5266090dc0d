"""explore: the latent-space report on generated data, a plain folder, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.bundle import MANIFEST, load_bundle
from service.preprocessing import list_image_files, load_image_file
from service.runtime import Scorer
from tests.conftest import DEMO_SIZE
from tests.training_helpers import one_line_error
from training.cli import main
from training.demo_data import DEFECT_TYPES
from training.explore import (
    INTERPOLATION_STEPS,
    NEIGHBOURS,
    TRAVERSAL_COMPONENTS,
    Exploration,
    distances,
    explore,
)
from training.explore_report import write_report

N_TRAIN = DEMO_SIZE["n_train"]
N_TEST = DEMO_SIZE["n_test_good"] + DEMO_SIZE["n_test_per_defect"] * len(DEFECT_TYPES)


@pytest.fixture(scope="module")
def explored(
    trained_bundle: Path, demo_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Exploration, Path]:
    """The demo data explored once, with its report written."""
    exploration = explore(trained_bundle, demo_data, device="cpu", seed=0)
    out = tmp_path_factory.mktemp("explore")
    write_report(out, exploration)
    return exploration, out


def _report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "explore.json").read_text(encoding="utf-8"))
    return data


def test_report_files(explored: tuple[Exploration, Path]) -> None:
    _, out = explored
    report = _report(out)
    figures = ["map.png", "separation.png", "interpolations.png", "traversals.png", "samples.png"]
    figures += [f"defects_{kind}.png" for kind in sorted(DEFECT_TYPES)]
    assert sorted(report["figures"]) == sorted(figures)
    page = (out / "index.html").read_text(encoding="utf-8")
    for name in figures:
        with Image.open(out / name) as figure:
            assert figure.format == "PNG" and figure.width > 300
        assert f'src="{name}"' in page
    assert report["skipped"] == []


def test_map_and_separation_numbers(
    explored: tuple[Exploration, Path], trained_bundle: Path
) -> None:
    _, out = explored
    report = _report(out)
    latent_dim = load_bundle(trained_bundle).manifest.latent_dim
    assert report["bundle"]["latent_dim"] == report["latent"]["latent_dim"] == latent_dim
    assert 0 <= report["latent"]["active_dims"] <= latent_dim
    points = report["map"]["points"]
    assert len(points) == N_TRAIN + N_TEST
    assert {p["label"] for p in points} == {"train/good", "test/good"} | {
        f"test/{kind}" for kind in DEFECT_TYPES
    }
    for point in points:
        assert len(point["pca"]) == len(point["tsne"]) == 2
        assert np.all(np.isfinite(point["pca"] + point["tsne"]))
    explained = report["pca"]["explained_variance_ratio"]
    assert explained == sorted(explained, reverse=True) and 0 < sum(explained) <= 1.0001
    separation = report["separation"]
    assert "nearest normal training images" in separation["score"] and separation["k"] == 5
    assert set(separation["classes"]) == set(DEFECT_TYPES)
    for numbers in separation["classes"].values():
        assert numbers["n"] == DEMO_SIZE["n_test_per_defect"]
        assert 0.0 <= numbers["auroc_distance"] <= 1.0 and 0.0 <= numbers["auroc_kl"] <= 1.0
    assert len(report["traversals"]) == TRAVERSAL_COMPONENTS
    assert report["samples"]["n"] == 8


def test_interpolation_ends_decode_to_the_reconstructions(
    explored: tuple[Exploration, Path], trained_bundle: Path
) -> None:
    exploration, out = explored
    kinds = [strip["kind"] for strip in _report(out)["interpolations"]]
    assert kinds == ["good to good"] * 2 + ["good to defective"] * len(DEFECT_TYPES)
    scorer = Scorer(load_bundle(trained_bundle), device="cpu")
    spec = scorer.manifest.input
    for strip in exploration.strips:
        assert strip.frames.shape == (INTERPOLATION_STEPS, *spec.shape)
        assert strip.t[0] == 0.0 and strip.t[-1] == 1.0
        for (_, path, image), frame in (
            (strip.start, strip.frames[0]),
            (strip.end, strip.frames[-1]),
        ):
            np.testing.assert_array_equal(image, load_image_file(path, spec))
            recon = scorer.run_model(image[None]).recon[0]
            np.testing.assert_allclose(frame, recon, atol=1e-5)


def test_neighbours_are_the_nearest_training_files(
    explored: tuple[Exploration, Path], demo_data: Path
) -> None:
    exploration, out = explored
    defects = _report(out)["defects"]
    assert len(defects) == DEMO_SIZE["n_test_per_defect"] * len(DEFECT_TYPES)
    train = {str(p) for p in list_image_files(demo_data / "train" / "good")}
    normal, test = exploration.normal, exploration.test
    assert test is not None
    for row, case in zip(defects, exploration.defects, strict=True):
        assert row["file"] == str(test.paths[case.index]) and row["label"] != "test/good"
        files = [n["file"] for n in row["neighbours"]]
        assert len(files) == NEIGHBOURS and set(files) <= train
        d = distances(test.mu[case.index][None], normal.mu)[0]
        nearest = [str(normal.paths[i]) for i in np.argsort(d, kind="stable")[:NEIGHBOURS]]
        assert files == nearest
        shown = [n["distance"] for n in row["neighbours"]]
        np.testing.assert_allclose(shown, np.sort(d)[:NEIGHBOURS], atol=1e-3)


def test_plain_folder_through_the_cli(
    trained_bundle: Path, demo_data: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(demo_data / "train" / "good", folder)
    out = tmp_path / "report"
    assert (
        main(["explore", str(trained_bundle), str(folder), "--out", str(out), "--device", "cpu"])
        == 0
    )
    report = _report(out)
    assert report["separation"] is None and report["defects"] == []
    assert report["data"]["test"] is None
    skipped = {row["what"]: row["why"] for row in report["skipped"]}
    assert "has no test/ folder" in skipped["separation of the defect classes"]
    assert "Not shown" in (out / "index.html").read_text(encoding="utf-8")
    assert [s["kind"] for s in report["interpolations"]] == ["good to good"] * 2
    assert len(report["map"]["points"]) == N_TRAIN
    assert sorted(report["figures"]) == [
        "interpolations.png",
        "map.png",
        "samples.png",
        "traversals.png",
    ]


def test_test_split_of_good_images_only(
    trained_bundle: Path, demo_data: Path, tmp_path: Path
) -> None:
    for folder in ("train/good", "test/good"):
        shutil.copytree(demo_data / folder, tmp_path / folder)
    exploration = explore(trained_bundle, tmp_path, device="cpu")
    assert exploration.separation == {} and exploration.defects == ()
    assert dict(exploration.skipped)["separation of the defect classes"] == (
        "test/ holds no defective images, only test/good"
    )


def _tampered_bundle(trained_bundle: Path, tmp_path: Path, change: dict[str, Any]) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    for key, value in change.items():
        if isinstance(value, dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    (bundle / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return bundle


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing bundle", "does not exist"),
        ("missing data", "does not exist"),
        ("no images", "holds no images"),
        ("input spec", "input spec and latent grid expect"),
        ("latent size", "does not give latent_dim 7"),
        ("output is a file", "is not a folder"),
    ],
)
def test_errors_are_one_line(
    trained_bundle: Path,
    demo_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    bundle, data = trained_bundle, demo_data
    if case == "missing bundle":
        bundle = tmp_path / "nope"
    elif case == "missing data":
        data = tmp_path / "nothing"
    elif case == "no images":
        data = tmp_path / "data"
        data.mkdir()
        (data / "notes.txt").write_text("no images here")
    elif case == "input spec":
        bundle = _tampered_bundle(trained_bundle, tmp_path, {"input": {"height": 48}})
    elif case == "latent size":
        bundle = _tampered_bundle(trained_bundle, tmp_path, {"latent_dim": 7})
    out = tmp_path / "report"
    if case == "output is a file":
        out.write_text("not a folder")
    assert main(["explore", str(bundle), str(data), "--out", str(out), "--device", "cpu"]) == 1
    one_line_error(capsys, message)
    assert not (out / "index.html").exists()


def test_identical_images_skip_what_needs_variation(
    trained_bundle: Path, demo_data: Path, tmp_path: Path
) -> None:
    image = (demo_data / "train" / "good" / "000.png").read_bytes()
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(image)
    exploration = explore(trained_bundle, folder, device="cpu")
    files = {path.name for path in write_report(tmp_path / "report", exploration)}
    assert files == {"map.png", "samples.png", "explore.json", "index.html"}
    skipped = dict(exploration.skipped)
    assert skipped["traversals"] == "the posterior means of the normal images do not vary"
    assert skipped["t-SNE map"] == "3 images; t-SNE needs at least 6"
