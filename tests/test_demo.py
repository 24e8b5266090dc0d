"""The end-to-end demo (``make demo``) on a workdir seeded with the session's data and bundle."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import training.demo
from service.bundle import FORMAT_VERSION, MANIFEST, load_bundle
from training.demo import _prepare_bundle, run
from training.evaluate import evaluate_bundle


def test_demo_scores_every_test_image_through_the_service_and_stops_cleanly(
    demo_data: Path, trained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(demo_data, tmp_path / "data")
    shutil.copytree(trained_bundle, tmp_path / "bundle")
    n_test = len(list((demo_data / "test").rglob("*.png")))

    args = argparse.Namespace(workdir=tmp_path, seed=0, retrain=False, max_steps=20)
    assert run(args) == 0

    out = capsys.readouterr().out
    assert "reusing the bundle" in out
    assert f"images scored      {n_test} of {n_test} through the gRPC stream" in out
    assert f"anomaly_images_scored_total read {n_test}" in out
    assert "exit code 0" in out
    match = re.search(r"AUROC \(combined\)\s+([0-9.]+) on the demo test set", out)
    assert match is not None
    # The AUROC of the scores that came through the service is training evaluate's.
    expected = evaluate_bundle(trained_bundle, demo_data, device="cpu")["auroc_combined"]
    assert float(match.group(1)) == pytest.approx(expected, abs=6e-4)


CachedWorkdir = Callable[..., Path]


@pytest.fixture
def cached_workdir(demo_data: Path, trained_bundle: Path, tmp_path: Path) -> CachedWorkdir:
    """Makes ``tmp_path`` a demo workdir whose cached bundle is the session's, its manifest
    marked ``version`` (and changed by ``edit``); returns the workdir."""

    def make(version: int, edit: Callable[[dict[str, Any]], None] = lambda data: None) -> Path:
        shutil.copytree(demo_data, tmp_path / "data")
        shutil.copytree(trained_bundle, tmp_path / "bundle")
        manifest = tmp_path / "bundle" / MANIFEST
        data = {**json.loads(manifest.read_text()), "format_version": version}
        edit(data)
        manifest.write_text(json.dumps(data))
        return tmp_path

    return make


def _recorded_fits(monkeypatch: pytest.MonkeyPatch, trained_bundle: Path) -> list[int]:
    """The demo's fits, recorded by their step budget; the session bundle stands in for each
    (the real fit takes minutes)."""
    fits: list[int] = []

    def fit(data_dir: Path, bundle_dir: Path, config: Any, *, overwrite: bool) -> Path:
        fits.append(config.max_steps)
        shutil.rmtree(bundle_dir)
        return Path(shutil.copytree(trained_bundle, bundle_dir))

    monkeypatch.setattr(training.demo, "fit_bundle", fit)
    return fits


def test_a_cached_bundle_this_release_refuses_is_fitted_again(
    cached_workdir: CachedWorkdir,
    trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = cached_workdir(7)
    fits = _recorded_fits(monkeypatch, trained_bundle)
    bundle_dir, fitted = _prepare_bundle(workdir, seed=0, retrain=False, steps=20)
    out = capsys.readouterr().out
    assert (
        f"cannot be used: manifest format_version is 7; this software reads {FORMAT_VERSION}" in out
    )
    assert "training a bundle" in out and fits == [20]
    assert fitted == load_bundle(bundle_dir).manifest
    loads: list[Path] = []

    def counting_load(path: Path) -> Any:
        loads.append(path)
        return load_bundle(path)

    monkeypatch.setattr(training.demo, "load_bundle", counting_load)
    # Now usable: reused, not refitted, and loaded once.
    _, reused = _prepare_bundle(workdir, seed=0, retrain=False, steps=20)
    assert "reusing the bundle" in capsys.readouterr().out and fits == [20]
    assert loads == [bundle_dir] and reused == fitted


def test_a_cached_bundle_of_an_upgradable_format_is_upgraded_not_fitted(
    cached_workdir: CachedWorkdir,
    trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = cached_workdir(9)

    def no_fit(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("an upgradable cached bundle must not be fitted again")

    monkeypatch.setattr(training.demo, "fit_bundle", no_fit)
    _, upgraded = _prepare_bundle(workdir, seed=0, retrain=False, steps=20)
    out = capsys.readouterr().out
    assert "is of format 9, an older release's: upgrading it" in out
    assert f"(format 9) to format {FORMAT_VERSION}" in out and "training a bundle" not in out
    assert "cannot be used" not in out
    assert upgraded.format_version == FORMAT_VERSION
    # The rule follows from the held-out scores the manifest keeps: the session bundle's own.
    assert upgraded.calibration.rule == load_bundle(trained_bundle).manifest.calibration.rule
    assert sorted(p.name for p in workdir.iterdir()) == ["bundle", "data"]
    # Served from now on: reused as it is.
    _, reused = _prepare_bundle(workdir, seed=0, retrain=False, steps=20)
    assert "reusing the bundle" in capsys.readouterr().out and reused == upgraded


def test_a_cached_bundle_that_cannot_be_upgraded_is_fitted_again(
    cached_workdir: CachedWorkdir,
    trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    def edited(data: dict[str, Any]) -> None:
        data["calibration"]["rule"]["method"] = "empirical"  # does not follow from its scores

    workdir = cached_workdir(9, edited)
    fits = _recorded_fits(monkeypatch, trained_bundle)
    _prepare_bundle(workdir, seed=0, retrain=False, steps=20)
    out = capsys.readouterr().out
    assert "cannot be upgraded:" in out and "training a bundle" in out and fits == [20]
    assert sorted(p.name for p in workdir.iterdir()) == ["bundle", "data"]
