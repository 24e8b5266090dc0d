"""bench/rule_study.py: other rules fitted on a real bundle's held-out scores, the product's
default reproducing what the fit and evaluate computed; the refusal of a missing bundle, which
bench/window_screen.py shares."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench import window_screen
from bench.rule_study import CANDIDATES, Combiner, StudyScores, main, study, study_scores
from service.bundle import load_bundle
from training.evaluate import run_evaluation


@pytest.fixture(scope="module")
def scored(trained_bundle: Path, demo_data: Path) -> StudyScores:
    return study_scores(trained_bundle, demo_data)


def test_the_default_rule_reproduces_the_fit_and_evaluate(
    scored: StudyScores, trained_bundle: Path, demo_data: Path
) -> None:
    rows = {row.name: row for row in study(scored)}
    assert list(rows) == list(CANDIDATES)
    default = rows["default"]
    decision = load_bundle(trained_bundle).manifest.training["decision"]
    assert default.weights == decision["weights"]
    assert default.synthetic_auroc == pytest.approx(decision["synthetic_auroc"], abs=1e-12)
    metrics = run_evaluation(trained_bundle, demo_data)[1].metrics
    assert default.auroc == pytest.approx(metrics["auroc_combined"], abs=5e-5)
    assert default.tpr == pytest.approx(metrics["tpr_at_threshold"], abs=5e-5)
    assert default.fpr == pytest.approx(metrics["fpr_at_threshold"], abs=5e-5)
    for row in rows.values():
        assert 0.0 <= row.auroc <= 1.0 and 0.0 <= row.synthetic_auroc <= 1.0
        assert any(w > 0 for w in row.weights.values())


def test_tail_scaling_puts_each_terms_percentile_at_its_gaussian_quantile(
    scored: StudyScores,
) -> None:
    held_out = scored.held_out
    combine = Combiner({"local_error": 1.0}, tail=(0.9, 1.2816)).fit(held_out)
    # One term: the soft maximum is that term's standardised log score.
    standardised = combine(held_out)
    assert np.quantile(standardised, 0.9) - np.median(standardised) == pytest.approx(1.2816)


def test_the_cli_prints_every_rule_and_writes_json(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rules.json"
    main([str(trained_bundle), str(demo_data), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "each term alone" in printed
    for name in CANDIDATES:
        assert f"\n{name} " in printed
    document = json.loads(out.read_text())
    assert [row["name"] for row in document["rules"]] == list(CANDIDATES)
    assert set(document["terms"]) == {
        "defect_probability",
        "local_error",
        "latent_distance",
        "coarse_error",
    }


def test_a_folder_without_the_held_out_images_is_refused(
    trained_bundle: Path, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    good = other / "train" / "good"
    for image in sorted(good.iterdir())[1:]:
        image.unlink()
    with pytest.raises(SystemExit) as exit_:
        main([str(trained_bundle), str(other)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "held-out images are not in" in err and "was the bundle fitted on" in err


@pytest.mark.parametrize("script_main", [main, window_screen.main], ids=["rules", "windows"])
def test_a_missing_bundle_is_refused(
    script_main: Callable[[list[str]], None],
    demo_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        script_main([str(tmp_path / "no-bundle"), str(demo_data)])
    assert exit_.value.code == 2
    assert "no-bundle does not exist" in capsys.readouterr().err
