"""bench/weight_ceiling.py: every weight vector of a grid fitted on held-out scores and read on
the test split; the product's own weights reproduce rule_study's default row (and so evaluate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rule_study import TERMS, StudyScores, study, study_scores
from bench.weight_ceiling import default_weights, main, scan, weight_grid


@pytest.fixture(scope="module")
def scored(trained_bundle: Path, demo_data: Path) -> StudyScores:
    return study_scores(trained_bundle, demo_data)


def test_the_grid_holds_every_vector_but_all_zero() -> None:
    grid = weight_grid([0.0, 1.0, 2.0])
    assert len(grid) == 3 ** len(TERMS) - 1
    assert len(set(grid)) == len(grid)
    assert (0.0,) * len(TERMS) not in grid
    assert all(len(w) == len(TERMS) for w in grid)


def test_the_products_weights_reproduce_the_default_rule(scored: StudyScores) -> None:
    rows = {row.weights: row for row in scan([scored, scored], [0.0, 1.0])}
    assert len(rows) == 2 ** len(TERMS) - 1
    product = rows[default_weights()]
    default = study(scored)[0]
    assert default.name == "default"
    for row in product.rows:
        assert (row.auroc, row.tpr, row.fpr) == (default.auroc, default.tpr, default.fpr)
    assert product.mean_tpr == pytest.approx(default.tpr)
    # One term alone scores the test split by that term: the vectors differ.
    assert len({(r.rows[0].auroc, r.rows[0].tpr) for r in rows.values()}) > 1


def test_the_cli_prints_the_products_row_the_best_and_each_datasets_best(
    trained_bundle: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(trained_bundle), str(demo_data), "--levels", "0", "1", "--top", "3"])
    printed = capsys.readouterr().out
    assert "product's weights   (1,1,1,1)" in printed
    assert "of 15 vectors" in printed
    assert f"best for {demo_data.name} alone: (" in printed
    assert "mean of each dataset's own best TPR" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["lonely"], "in pairs"), (["--levels", "0"], "one above 0")],
    ids=["odd-paths", "all-zero-levels"],
)
def test_bad_arguments_are_refused(
    trained_bundle: Path,
    demo_data: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(trained_bundle), str(demo_data), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
