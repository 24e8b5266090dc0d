"""bench/window_screen.py: other local windows screened on a real bundle's held-out good images
and synthetic defects, every window's scores those the service computes at that window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.rule_study import held_out_images
from bench.window_screen import DEFECT_SIZES, halvings, main, raw_by_window, screen
from service.runtime import open_scorer
from service.scoring import raw_scores
from training.errors import DataError


def test_each_windows_scores_are_the_services_at_that_window(
    trained_bundle: Path, demo_data: Path
) -> None:
    scorer = open_scorer(trained_bundle)
    images = held_out_images(scorer, trained_bundle, demo_data)[:5]
    own = scorer.calibration.local_window
    windows = (own, 2 * own)
    found = raw_by_window(scorer, [images[:3], images[3:]], windows)
    assert set(found) == set(windows)
    # At the bundle's own window, exactly what the service scores.
    served = scorer.raw_scores(images)[0]
    for name, values in served.items():
        np.testing.assert_allclose(found[own][name], values, rtol=1e-12, err_msg=name)
    out = scorer.graphs.run(images)
    bundle = scorer.bundle
    wider = raw_scores(images, out, 2 * own, bundle.latent_reference, bundle.error_reference)[0]
    for name, values in wider.items():
        np.testing.assert_allclose(found[2 * own][name], values, rtol=1e-12, err_msg=name)
    assert not np.allclose(found[own]["local_error"], found[2 * own]["local_error"])


def test_halvings_are_disjoint_halves_covering_every_image_and_repeat() -> None:
    splits = halvings(11, 5)
    assert len(splits) == 5
    for calibrating, scored in splits:
        assert calibrating.size == 5 and scored.size == 6
        np.testing.assert_array_equal(np.sort(np.r_[calibrating, scored]), np.arange(11))
    assert len({tuple(c) for c, _ in splits}) > 1
    for (c1, s1), (c2, s2) in zip(splits, halvings(11, 5), strict=True):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(s1, s2)
    with pytest.raises(DataError, match="at least 4"):
        halvings(3, 2)


def test_the_screen_gives_one_row_per_window_with_figures_in_range(
    trained_bundle: Path, demo_data: Path
) -> None:
    own = open_scorer(trained_bundle).calibration.local_window
    rows = screen(trained_bundle, demo_data, (own, 2 * own), 3)
    assert [row.window for row in rows] == [own, 2 * own]
    for row in rows:
        assert set(row.auroc) == set(row.tpr) == set(DEFECT_SIZES)
        assert all(0.0 <= v <= 1.0 for v in (*row.auroc.values(), *row.tpr.values()))
        assert 0.0 <= row.good_flagged <= 1.0
    # The demo's defects are easy at full size: well above chance at the bundle's window.
    assert rows[0].auroc["full"] > 0.8
    assert rows == screen(trained_bundle, demo_data, (own, 2 * own), 3)


def test_the_cli_prints_every_window_and_writes_json(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "windows.json"
    main(
        [
            str(trained_bundle),
            str(demo_data),
            "--windows",
            "3",
            "5",
            "--halvings",
            "2",
            "--json",
            str(out),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert "good flagged" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["3", "5"]
    document = json.loads(out.read_text())
    assert [row["window"] for row in document] == [3, 5]
    assert set(document[0]["tpr"]) == set(DEFECT_SIZES)


def test_a_window_below_one_pixel_is_refused(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A missing bundle is refused as bench/rule_study.py refuses it (tested there for both).
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no-bundle"), str(demo_data), "--windows", "0"])
    assert exit_.value.code == 2
    assert "at least 1" in capsys.readouterr().err
