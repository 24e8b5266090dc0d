"""Other local windows for a fitted bundle, screened on held-out good images and synthetic
defects only: no test image is read.

    python bench/window_screen.py BUNDLE DATA_DIR [--windows 8 10 12 16] [--json FILE]

The bundle's graphs run once over its held-out good images (the names its manifest lists, read
from ``DATA_DIR``'s training folder) and over synthetic defects made from them: the fit's
held-out kinds (pasted patches, blotches, noise, relighting) at their own size, and the same
kinds at a quarter of their linear size (specks from a 64th of the shorter side). Every window's
raw scores come from those outputs. The held-out set is then split in halves ``--halvings``
times: one half calibrates every score and the threshold for the bundle's false-alarm rate, as
a fit would (``Calibration.fit``); the other half and the synthetic defects made from it are
scored. Printed per window, as means over the halvings: the AUROC of good against defective and
the share of defects flagged at the threshold (TPR), for each defect size, and the share of the
scored good half flagged. The window only reads the graphs' outputs; it never enters the
training, so a window screened here is the window a fit with ``--local-window`` would use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt

from bench.rule_study import held_out_images
from service.bundle import BundleError
from service.runtime import Scorer, open_scorer
from service.scoring import Calibration, batch_slices, raw_scores, window_max
from training.calibrate import SCORING_BATCH, SYNTHETIC_COPIES, joined_scores
from training.errors import DataError
from training.metrics import auroc
from training.synth import held_out_defects, synthesised_batches

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
Raw = Mapping[str, F64Array]
DEFECT_SIZES: Mapping[str, float] = {"full": 1.0, "quarter": 0.25}
HALVING_SEED = 12345


@dataclass(frozen=True)
class WindowRow:
    """One window's means over the halvings."""

    window: int
    auroc: dict[str, float]  # by defect size
    tpr: dict[str, float]  # by defect size, at the calibrating half's threshold
    good_flagged: float


def raw_by_window(
    scorer: Scorer, batches: Iterable[F32Array], windows: tuple[int, ...]
) -> dict[int, dict[str, F64Array]]:
    """The raw scores of every image of ``batches`` at each window, the graphs and the scores
    that do not read the window computed once per batch."""
    parts: dict[int, list[dict[str, F64Array]]] = {w: [] for w in windows}
    latent, errors = scorer.bundle.latent_reference, scorer.bundle.error_reference
    for batch in batches:
        images = np.ascontiguousarray(batch)
        out = scorer.graphs.run(images)
        scores, maps = raw_scores(images, out, windows[0], latent, errors)
        for w in windows:
            parts[w].append(
                {
                    **scores,
                    "local_error": window_max(maps.squared_error, w),
                    "defect_probability": window_max(maps.defect_map, w),
                }
            )
    return {w: joined_scores(found) for w, found in parts.items()}


def halvings(n: int, count: int) -> list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """``count`` seeded splits of ``n`` rows into a calibrating half and a scored half."""
    if n < 4:
        raise DataError(f"the bundle holds out {n} images; halving needs at least 4")
    rng = np.random.default_rng(HALVING_SEED)
    orders = [rng.permutation(n) for _ in range(count)]
    return [(np.sort(order[: n // 2]), np.sort(order[n // 2 :])) for order in orders]


def _rows(raw: Raw, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> dict[str, F64Array]:
    return {name: values[index] for name, values in raw.items()}


def screen(bundle: Path, data_dir: Path, windows: tuple[int, ...], count: int) -> list[WindowRow]:
    """Each window's row (see the module's docstring)."""
    scorer = open_scorer(bundle)
    held_out = held_out_images(scorer, bundle, data_dir)
    n = held_out.shape[0]
    seed = int(scorer.manifest.training["config"]["seed"])
    rate = scorer.calibration.rule.target_false_alarm_rate
    weights = scorer.calibration.weights
    good = raw_by_window(scorer, (held_out[r] for r in batch_slices(n, SCORING_BATCH)), windows)
    defective = {
        label: raw_by_window(
            scorer,
            synthesised_batches(
                held_out,
                copies=SYNTHETIC_COPIES,
                seed=seed,
                batch=SCORING_BATCH,
                defects=held_out_defects(size),
            ),
            windows,
        )
        for label, size in DEFECT_SIZES.items()
    }
    made_from = np.repeat(np.arange(n), SYNTHETIC_COPIES)
    splits = halvings(n, count)
    rows = []
    for w in windows:
        aurocs: dict[str, list[float]] = {label: [] for label in DEFECT_SIZES}
        tprs: dict[str, list[float]] = {label: [] for label in DEFECT_SIZES}
        flagged: list[float] = []
        for calibrating, scored in splits:
            calibration = Calibration.fit(
                _rows(good[w], calibrating), weights, target_false_alarm_rate=rate, local_window=w
            )
            threshold = calibration.rule.threshold
            normal = calibration.combine(_rows(good[w], scored))
            flagged.append(float(np.mean(normal >= threshold)))
            for label, raw in defective.items():
                found = calibration.combine(_rows(raw[w], np.isin(made_from, scored)))
                labels = np.r_[np.zeros(normal.size), np.ones(found.size)]
                aurocs[label].append(auroc(np.r_[normal, found], labels))
                tprs[label].append(float(np.mean(found >= threshold)))
        rows.append(
            WindowRow(
                window=w,
                auroc={label: float(np.mean(v)) for label, v in aurocs.items()},
                tpr={label: float(np.mean(v)) for label, v in tprs.items()},
                good_flagged=float(np.mean(flagged)),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a fitted bundle directory or archive")
    parser.add_argument("data_dir", type=Path, help="the MVTec-layout folder it was fitted on")
    parser.add_argument(
        "--windows", type=int, nargs="+", default=[8, 10, 12, 16], help="sides in pixels"
    )
    parser.add_argument("--halvings", type=int, default=20, help="splits of the held-out set")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.windows) < 1 or args.halvings < 1:
        parser.error("windows and halvings must be at least 1")
    try:
        rows = screen(args.bundle, args.data_dir, tuple(args.windows), args.halvings)
    except (BundleError, DataError) as exc:
        parser.exit(2, f"window_screen: {exc}\n")
    sizes = list(DEFECT_SIZES)
    print(
        f"{'window':>6} "
        + " ".join(f"{'AUROC ' + s:>13} {'TPR ' + s:>12}" for s in sizes)
        + f" {'good flagged':>12}"
    )
    for row in rows:
        print(
            f"{row.window:>6} "
            + " ".join(f"{row.auroc[s]:>13.4f} {row.tpr[s]:>12.4f}" for s in sizes)
            + f" {row.good_flagged:>12.4f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
