"""The product end to end on its built-in demo data (``make demo``).

Generates the demo dataset, fits a bundle (once; reused on later runs while this release can
serve it), starts the gRPC service in a subprocess, streams every test image through the client,
prints a summary (images scored, anomalies flagged, AUROC, where the metrics are served) and
stops the service with SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service.bundle import (
    MANIFEST,
    UPGRADABLE_FORMATS,
    BundleError,
    Manifest,
    load_bundle,
    read_manifest_json,
)
from service.client import Client, Result
from service.preprocessing import list_image_files
from service.runtime import DeviceError
from service.server_process import ServerProcess, ServerStartError
from service.upgrade import describe, upgrade_bundle
from training.demo_data import generate_demo_dataset
from training.fit import FitConfig, fit_bundle
from training.metrics import auroc

HOST = "127.0.0.1"
GRACE_PERIOD_S = 10.0


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class LabelledImage:
    """A test image and whether its folder marks it as defective."""

    path: Path
    image_id: str
    anomalous: bool


def _test_images(data_dir: Path) -> list[LabelledImage]:
    images = [
        LabelledImage(path, str(path.relative_to(data_dir)), path.parent.name != "good")
        for path in list_image_files(data_dir / "test", recursive=True)
    ]
    if not images:
        raise DemoError(f"no test images under {data_dir / 'test'}")
    return images


def _cached_manifest(bundle_dir: Path) -> Manifest | str | None:
    """The manifest of the demo's cached bundle when it can be served, why not when this release
    refuses it (e.g. an older format), or None when there is none yet."""
    if not (bundle_dir / MANIFEST).is_file():
        return None
    try:
        return load_bundle(bundle_dir).manifest
    except BundleError as exc:
        return str(exc)


def _upgradable_format(bundle_dir: Path) -> int | None:
    """The cached bundle's format where ``service.upgrade`` reads it, else None."""
    try:
        version = read_manifest_json(bundle_dir).get("format_version")
    except BundleError:
        return None
    return version if type(version) is int and version in UPGRADABLE_FORMATS else None


def _upgraded_in_place(bundle_dir: Path, version: int) -> Manifest | None:
    """Bring the cached bundle of format ``version`` up to date with ``service.upgrade``
    (seconds, not a fit): its manifest, or None where the upgrade refuses (the reason said)."""
    print(
        f"[demo] the bundle in {bundle_dir} is of format {version}, an older release's: "
        "upgrading it (python -m service.upgrade)",
        flush=True,
    )
    upgraded = bundle_dir.with_name(bundle_dir.name + ".upgraded")
    previous = bundle_dir.with_name(bundle_dir.name + ".previous")
    for leftover in (upgraded, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        upgrade = upgrade_bundle(bundle_dir, upgraded)
    except (BundleError, DeviceError, OSError) as exc:
        print(f"[demo] the bundle in {bundle_dir} cannot be upgraded: {exc}", flush=True)
        return None
    bundle_dir.rename(previous)
    upgraded.rename(bundle_dir)
    shutil.rmtree(previous)
    print(f"[demo] {describe(upgrade, bundle_dir, bundle_dir)}", flush=True)
    return load_bundle(bundle_dir).manifest


def _prepare_bundle(workdir: Path, seed: int, retrain: bool, steps: int) -> tuple[Path, Manifest]:
    """The demo's bundle and its manifest: the cached one when it can be served (upgraded first
    where an older release wrote it in a format ``service.upgrade`` reads), else a new fit; a
    cached or fitted bundle is loaded once."""
    data_dir, bundle_dir = workdir / "data", workdir / "bundle"
    if not (data_dir / "train" / "good").is_dir():
        print(f"[demo] generating the demo dataset in {data_dir}", flush=True)
        generate_demo_dataset(data_dir, seed=seed)
    cached = None if retrain else _cached_manifest(bundle_dir)
    if isinstance(cached, Manifest):
        print(f"[demo] reusing the bundle in {bundle_dir} (--retrain to fit again)", flush=True)
        return bundle_dir, cached
    version = None if cached is None else _upgradable_format(bundle_dir)
    if version is not None:
        upgraded = _upgraded_in_place(bundle_dir, version)
        if upgraded is not None:
            return bundle_dir, upgraded
    elif cached is not None:
        print(f"[demo] the bundle in {bundle_dir} cannot be used: {cached}", flush=True)
    print(f"[demo] training a bundle in {bundle_dir} ({steps} steps)", flush=True)
    config = FitConfig(seed=seed, max_steps=steps, model_version="demo")
    fit_bundle(data_dir, bundle_dir, config, overwrite=True)
    return bundle_dir, load_bundle(bundle_dir).manifest


def _scored_total(metrics_port: int) -> float:
    url = f"http://{HOST}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "anomaly_images_scored_total"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir, manifest = _prepare_bundle(workdir, args.seed, args.retrain, args.max_steps)
    images = _test_images(workdir / "data")
    serve = ["--bundle", str(bundle_dir), "--host", HOST, "--port", "0", "--metrics-port", "0"]
    serve += ["--grace-period", str(GRACE_PERIOD_S)]
    print("[demo] starting the service", flush=True)
    server = ServerProcess(serve, log=workdir / "server.log")
    try:
        server.wait_ready()
        metrics_port = server.metrics_port
        print(f"[demo] serving on {server.target} (metrics on {metrics_port})", flush=True)
        with Client(server.target) as client:
            info = client.info()
            results: list[Result] = list(
                client.score_stream((image.image_id, image.path.read_bytes()) for image in images)
            )
        scored_metric = _scored_total(metrics_port)
    except ServerStartError as exc:
        raise DemoError(str(exc)) from exc
    finally:
        exit_code = server.stop(GRACE_PERIOD_S + 10)
        server.close()
    failures = [r for r in results if not r.ok]
    pairs = [(r, image) for r, image in zip(results, images, strict=True) if r.ok]
    flagged = [image for r, image in pairs if r.is_anomaly]
    n_anomalous = sum(image.anomalous for _, image in pairs)
    combined = [r.scores.combined for r, _ in pairs if r.scores is not None]
    labels = [image.anomalous for _, image in pairs]
    rule = manifest.calibration.rule
    print(
        "\nDemo summary\n"
        f"  images scored      {len(pairs)} of {len(images)} through the gRPC stream "
        f"({len(pairs) - n_anomalous} good, {n_anomalous} defective), {len(failures)} failed\n"
        f"  anomalies flagged  {len(flagged)}: {sum(i.anomalous for i in flagged)} of "
        f"{n_anomalous} defective, {sum(not i.anomalous for i in flagged)} of "
        f"{len(pairs) - n_anomalous} good (threshold {rule.threshold:.3f} for a "
        f"{rule.target_false_alarm_rate:.0%} false-alarm rate, {rule.method})\n"
        f"  AUROC (combined)   {auroc(combined, labels):.3f} on the demo test set\n"
        f"  model              {info.model_id} version {info.model_version} on "
        f"{info.execution_provider}\n"
        f"  metrics            were served at http://{HOST}:{metrics_port}/metrics "
        f"(anomaly_images_scored_total read {scored_metric:g})\n"
        f"  server             stopped with SIGTERM, exit code {exit_code}; log in "
        f"{workdir / 'server.log'}"
    )
    for failure in failures:
        print(f"  failed: {failure.id}: {failure.error}", file=sys.stderr)
    return 0 if not failures and exit_code == 0 else 1
