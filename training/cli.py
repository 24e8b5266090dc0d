"""The ``anomaly-train`` / ``python -m training`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.config import FitConfig, add_fit_arguments

log = logging.getLogger("training")
DEMO_STEPS = 400

DESCRIPTION = """\
Train a VAE anomaly detector on images of good parts and ship it as one ONNX bundle.

  python -m training demo-data data/            # generate the built-in demo dataset
  python -m training fit data/ --out bundle/    # train, calibrate, export, self-test
  python -m training evaluate bundle/ data/ --report report/
  python -m training explore bundle/ data/ --out explore/   # the latent space, as HTML
  python -m training benchmark data1/ data2/ --out suite/   # the quality suite, as a table
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _add_demo_data(sub: Any) -> None:
    p = sub.add_parser(
        "demo-data",
        help="generate the built-in demo dataset (MVTec layout)",
        description="Generate a procedural dataset of machined flanges with five defect types "
        "and exact masks, in the MVTec AD layout; deterministic by seed.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=_positive_int, default=128, help="side in pixels")
    p.add_argument("--n-train", type=_positive_int, default=80, help="normal training images")
    p.add_argument("--n-test-good", type=_positive_int, default=20, help="normal test images")
    p.add_argument("--n-test-per-defect", type=_positive_int, default=8, help="per defect type")


def _add_fit(sub: Any) -> None:
    p = sub.add_parser(
        "fit",
        help="train a bundle on a folder of good images",
        description="Train the VAE on DATA_DIR (an MVTec-layout folder, whose train/good is "
        "used, or a plain folder of images), calibrate on held-out normal images, export ONNX, "
        "check parity and write a self-tested bundle to BUNDLE_DIR. No option is needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="bundle folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    add_fit_arguments(p)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score DATA_DIR/test/* with a bundle and print metrics as JSON",
        description="Score every image under DATA_DIR/test/<kind>/ (good = normal) through ONNX "
        "Runtime exactly as the service does; print one JSON object of metrics on stdout.",
    )
    p.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="write PNG figures")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _add_benchmark(sub: Any) -> None:
    p = sub.add_parser(
        "benchmark",
        help="the quality suite: fit and evaluate every dataset, write a table",
        description="For each MVTec-layout DATA_DIR: fit a bundle with the given options (the "
        "defaults unless told otherwise) into OUT_DIR/<dataset>/bundle, evaluate it on its "
        "test/ split, and write OUT_DIR/benchmark.md and OUT_DIR/benchmark.json (one object per "
        "dataset, then the mean).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data_dirs", type=Path, nargs="+", metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="results folder")
    add_fit_arguments(p)


def _add_explore(sub: Any) -> None:
    p = sub.add_parser(
        "explore",
        help="a browsable report of the bundle's latent space on DATA_DIR",
        description="Encode DATA_DIR (an MVTec-layout folder: train/good and test/<kind>; or a "
        "plain folder of images) with the bundle's ONNX files and write OUT_DIR/index.html: a "
        "map of the posterior means (PCA and t-SNE), how well each defect class separates "
        "from good in the latent space, interpolations, traversals, decoded samples, and each "
        "defective image beside its nearest normal images; the numbers in OUT_DIR/explore.json.",
    )
    p.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="report folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE and the samples")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable normal images instead of stopping",
    )


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the product end to end on the demo data",
        description="Demo data -> training (cached in the workdir) -> gRPC service -> client.",
    )
    p.add_argument("--workdir", type=Path, default=Path(".demo"), help="cache folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="ignore a cached bundle")
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=DEMO_STEPS,
        help=f"step budget of the demo fit (default: {DEMO_STEPS}; the full default is "
        f"{FitConfig().max_steps})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_data(sub)
    _add_fit(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_explore(sub)
    _add_demo(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo-data":
        from training.demo_data import generate_demo_dataset

        out = generate_demo_dataset(
            args.out_dir,
            seed=args.seed,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_per_defect=args.n_test_per_defect,
        )
        log.info("wrote the demo dataset to %s", out)
    elif args.command == "fit":
        from training.fit import fit_bundle

        config = FitConfig.from_namespace(args)
        fit_bundle(args.data_dir, args.out, config, overwrite=args.overwrite)
    elif args.command == "benchmark":
        from training.benchmark import run_benchmark

        run_benchmark(args.data_dirs, args.out, FitConfig.from_namespace(args))
    elif args.command == "evaluate":
        from training.evaluate import evaluate_bundle

        metrics = evaluate_bundle(
            args.bundle_dir, args.data_dir, report_dir=args.report, device=args.device
        )
        print(json.dumps(metrics))
    elif args.command == "explore":
        from training.explore_report import run_explore

        run_explore(
            args.bundle_dir,
            args.data_dir,
            args.out,
            device=args.device,
            seed=args.seed,
            skip_bad=args.skip_bad_images,
        )
    else:
        import training.demo

        return int(training.demo.run(args))
    return 0


def _configure_logging(verbose: bool) -> None:
    # main() may run again in one process with another stderr (tests, notebooks): replace the
    # handler of an earlier run rather than write to that run's stream.
    for old in log.handlers[:]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors print one line on stderr and exit non-zero."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from service.bundle import BundleError
    from service.preprocessing import ImageError
    from service.runtime import DeviceError
    from training.errors import TrainingError

    try:
        return _run(args)
    except (TrainingError, BundleError, ImageError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
