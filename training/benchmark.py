"""``benchmark``: the quality suite. Fit each dataset with one configuration, evaluate, tabulate.

For every MVTec-layout folder: ``fit`` into ``OUT/<dataset>/bundle`` (the default settings unless
options are given), ``evaluate`` on its ``test/`` split, and one row of figures. After each
dataset ``OUT/benchmark.json`` (a list with one object per dataset, then the mean row) and
``OUT/benchmark.md`` (the same as a Markdown table, a table of every score's image AUROC alone,
one of the fit's checks on held-out normal images, one of the verdicts at the false-alarm rates
a request may ask, one of the test split against the held-out good images, and one of the
defects caught at the threshold by their area) are rewritten, so an interrupted run keeps what
it finished.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.bundle import load_bundle
from training.config import FitConfig
from training.errors import DataError
from training.evaluate import (
    AUROC_KEYS,
    FPR_BUDGETS,
    HELD_OUT_KEYS,
    budget_key,
    defect_area_keys,
    evaluate_bundle,
)
from training.fit import fit_bundle

log = logging.getLogger(__name__)

MEAN = "mean"
# The false-alarm budget of the suite's "best TPR" column (the target allows 3%).
SUITE_FPR_BUDGET = 0.03
_SUITE_BUDGET = budget_key(SUITE_FPR_BUDGET)
BEST_TPR_KEY = f"best_tpr_at_fpr_{_SUITE_BUDGET}"
# Columns of the table: (key, heading, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    ("auroc_combined", "image AUROC", "{:.3f}"),
    ("auroc_recon", "recon AUROC", "{:.3f}"),
    ("auroc_kl", "KL AUROC", "{:.3f}"),
    ("auroc_latent", "latent AUROC", "{:.3f}"),
    ("pixel_auroc", "pixel AUROC", "{:.3f}"),
    ("tpr_at_threshold", "TPR at threshold", "{:.3f}"),
    ("fpr_at_threshold", "FPR at threshold", "{:.3f}"),
    (BEST_TPR_KEY, f"best TPR at FPR ≤ {100 * SUITE_FPR_BUDGET:g}%", "{:.3f}"),
    ("fit_seconds", "fit (s)", "{:.0f}"),
    ("epochs", "epochs", "{:.1f}"),
)
# Every score's image AUROC alone, in the order of the scores: what each term of the combined
# score sees on each dataset (the table already shows recon, KL and latent).
SCORE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    *((key, name, "{:.3f}") for name, key in AUROC_KEYS.items()),
    ("auroc_combined", "combined", "{:.3f}"),
)
# What each fit found without test images: the decision rule's AUROC on held-out normal images
# against synthetic defects, and the share of held-out normal images its threshold flags as they
# are and once lit darker or brighter by the training's jitter.
CHECK_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    ("synthetic_auroc", "synthetic-defect AUROC", "{:.3f}"),
    ("heldout_flagged", "held-out flagged", "{:.3f}"),
    ("heldout_flagged_darker", "flagged darker", "{:.3f}"),
    ("heldout_flagged_brighter", "flagged brighter", "{:.3f}"),
)
# The verdicts a client gets by asking a false-alarm rate of its own per request (the service
# sets its threshold from the held-out good images alone): the trade-off an operator chooses on.
RATE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    *(
        column
        for rate in FPR_BUDGETS
        for column in (
            (f"tpr_at_rate_{budget_key(rate)}", f"TPR asking {100 * rate:g}%", "{:.3f}"),
            (f"fpr_at_rate_{budget_key(rate)}", f"FPR asking {100 * rate:g}%", "{:.3f}"),
        )
    ),
)
# The test split against the fit's held-out good images: whether its good images score like them
# (0.5) and how the defects stand against good images photographed like the training ones.
HELD_OUT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    ("n_held_out_good", "held-out good images", "{:.0f}"),
    ("auroc_defects_vs_held_out", "defects against them (AUROC)", "{:.3f}"),
    ("auroc_test_good_vs_held_out", "test/good against them (AUROC)", "{:.3f}"),
)
# The catch at the threshold by defect area (datasets with masks): how many defects of each size
# the test split holds and the share of them flagged.
AREA_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "dataset", "{}"),
    *(
        column
        for area in defect_area_keys()
        for column in (
            (f"defects_area_{area}", f"defects {area}", "{:.0f}"),
            (f"caught_area_{area}", f"caught {area}", "{:.3f}"),
        )
    ),
)
_TABLE_KEYS = frozenset(key for key, _, _ in COLUMNS)
AVERAGED = tuple(
    dict.fromkeys(
        key
        for key, _, _ in (
            *COLUMNS,
            *SCORE_COLUMNS,
            *CHECK_COLUMNS,
            *RATE_COLUMNS,
            *HELD_OUT_COLUMNS,
            *AREA_COLUMNS,
        )
        if key != "dataset"
    )
)


def dataset_names(data_dirs: Sequence[Path]) -> list[str]:
    """A unique name per folder: its own name, with as many parent folders as tell it apart
    from the others (``v1/bottle``, ``v2/bottle``); the same folder twice gets ``-2``, ``-3``."""
    parts = [Path(d).resolve().parts for d in data_dirs]
    names: list[str] = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(
            other[-depth:] == own[-depth:] and other != own
            for j, other in enumerate(parts)
            if j != i
        ):
            depth += 1
        name = base = "/".join(own[-depth:])
        copy = 1
        while name in names:
            copy += 1
            name = f"{base}-{copy}"
        names.append(name)
    return names


def _rounded(value: float | None) -> float | None:
    """A manifest figure to the 4 decimals of evaluate's metrics; None stays None."""
    return None if value is None else round(float(value), 4)


def _row(
    name: str, bundle_dir: Path, metrics: dict[str, Any], fit_seconds: float
) -> dict[str, Any]:
    training = load_bundle(bundle_dir).manifest.training
    steps = int(training["training"]["steps"])
    batch = int(training["config"]["batch_size"])
    n_train = int(training["data"]["n_train"])
    lighting = training.get("lighting") or {}
    return {
        "dataset": name,
        "auroc_combined": metrics["auroc_combined"],
        "auroc_recon": metrics["auroc_recon"],
        "auroc_kl": metrics["auroc_kl"],
        "auroc_latent": metrics["auroc_latent"],
        "pixel_auroc": metrics["pixel_auroc"],
        "tpr_at_threshold": metrics["tpr_at_threshold"],
        "fpr_at_threshold": metrics["fpr_at_threshold"],
        BEST_TPR_KEY: metrics["best_tpr_at_fpr"][_SUITE_BUDGET],
        "fit_seconds": round(fit_seconds, 1),
        "epochs": round(steps * batch / n_train, 1),
        **{key: metrics[key] for key in AUROC_KEYS.values() if key not in _TABLE_KEYS},
        "steps": steps,
        "auroc_by_type": metrics["auroc_combined_by_type"],
        "test_copies_of_training": metrics["test_copies_of_training"],
        **{key: metrics[key] for key in HELD_OUT_KEYS},
        "synthetic_auroc": _rounded(training["decision"]["synthetic_auroc"]),
        "heldout_flagged": _rounded(lighting.get("flagged")),
        "heldout_flagged_darker": _rounded(lighting.get("flagged_darker")),
        "heldout_flagged_brighter": _rounded(lighting.get("flagged_brighter")),
        **{
            f"{figure}_at_rate_{rate}": verdicts[figure]
            for rate, verdicts in metrics["at_requested_rate"].items()
            for figure in ("tpr", "fpr")
        },
        **_by_area(metrics["caught_by_defect_area"]),
    }


def _by_area(by_area: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """evaluate's catch by defect area as the row's flat keys: None for a dataset without masks."""
    return {
        f"{figure}_area_{area}": None if by_area is None else by_area[area][figure]
        for area in defect_area_keys()
        for figure in ("defects", "caught")
    }


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every figure over the datasets that have it (pixel AUROC needs masks)."""
    mean: dict[str, Any] = {"dataset": MEAN}
    for key in AVERAGED:
        values = [row[key] for row in rows if row.get(key) is not None]
        mean[key] = round(sum(values) / len(values), 4) if values else None
    return mean


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS
) -> str:
    """The rows as a Markdown table of ``columns``; a missing figure shows as an en dash."""
    lines = [
        "| " + " | ".join(heading for _, heading, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cell = "–" if missing else fmt.format(value)
            cells.append(f"**{cell}**" if row["dataset"] == MEAN else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, rows: list[dict[str, Any]], config: FitConfig) -> None:
    table = [*rows, mean_row(rows)]
    (out_dir / "benchmark.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    changed = {
        k: v
        for k, v in config.to_dict().items()
        if v != getattr(FitConfig(), k) and k != "progress"
    }
    settings = (
        "default settings"
        if not changed
        else "settings: " + ", ".join(f"{k}={v}" for k, v in changed.items())
    )
    text = (
        f"# Quality suite ({settings})\n\n{markdown_table(table)}\n"
        f"## Image AUROC of each score alone\n\n{markdown_table(table, SCORE_COLUMNS)}\n"
        f"## Checks without test images\n\n{markdown_table(table, CHECK_COLUMNS)}\n"
        "## Verdicts at a false-alarm rate asked per request (thresholds from held-out good "
        f"images)\n\n{markdown_table(table, RATE_COLUMNS)}\n"
        "## The test split against the held-out good images (0.5: scored alike)\n\n"
        f"{markdown_table(table, HELD_OUT_COLUMNS)}\n"
        "## Defects caught at the threshold by their area (the mask's share of the frame)\n\n"
        f"{markdown_table(table, AREA_COLUMNS)}"
    )
    (out_dir / "benchmark.md").write_text(text, encoding="utf-8")


def run_benchmark(
    data_dirs: Sequence[Path], out_dir: Path, config: FitConfig | None = None
) -> list[dict[str, Any]]:
    """Fit and evaluate every dataset; returns the rows followed by the mean row."""
    config = config or FitConfig()
    for data_dir in data_dirs:
        if not (Path(data_dir) / "test").is_dir():
            raise DataError(
                f"{data_dir} has no test/ folder; the suite needs MVTec-layout datasets"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    names = dataset_names(data_dirs)
    for i, (data_dir, name) in enumerate(zip(data_dirs, names, strict=True), start=1):
        bundle_dir = out_dir / name / "bundle"
        log.info("[%d/%d] %s: fitting %s", i, len(data_dirs), name, data_dir)
        started = time.monotonic()
        fit_bundle(Path(data_dir), bundle_dir, config, overwrite=True)
        fit_seconds = time.monotonic() - started
        log.info("[%d/%d] %s: evaluating (fit took %.0f s)", i, len(data_dirs), name, fit_seconds)
        metrics = evaluate_bundle(bundle_dir, Path(data_dir), report_dir=out_dir / name / "report")
        row = _row(name, bundle_dir, metrics, fit_seconds)
        rows.append(row)
        log.info(
            "[%d/%d] %s: image AUROC %.3f, latent AUROC %.3f, TPR %.2f at FPR %.2f (the best "
            "threshold on the test set: TPR %.2f at FPR <= %g)",
            i, len(data_dirs), name, row["auroc_combined"], row["auroc_latent"],
            row["tpr_at_threshold"], row["fpr_at_threshold"], row[BEST_TPR_KEY], SUITE_FPR_BUDGET,
        )  # fmt: skip
        _write(out_dir, rows, config)
    log.info("wrote %s and %s", out_dir / "benchmark.md", out_dir / "benchmark.json")
    return [*rows, mean_row(rows)]
