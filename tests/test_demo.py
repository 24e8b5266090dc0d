"""The end-to-end demo (``make demo``) on a workdir seeded with the session's data and bundle."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest

from training.demo import run
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
