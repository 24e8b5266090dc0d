"""Loading and hot reload in process: bad bundles are refused with a clear reason, the watcher
reloads a bundle that changes on disk, and the old model serves until a good one is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.bundle import BundleError
from service.client import Client
from service.model_slot import load_model
from service.server import ServerThread
from tests.service_helpers import random_pixels, serve_config, wait_until


@pytest.fixture
def bundle(trained_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(trained_bundle, copy)
    return copy


def set_version(bundle: Path, version: str) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model_version"] = version
    path.write_text(json.dumps(manifest))


def test_a_missing_file_is_refused(bundle: Path) -> None:
    (bundle / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"lacks decoder\.onnx"):
        load_model(bundle, "cpu")


def test_changed_onnx_files_are_refused(bundle: Path) -> None:
    with (bundle / "encoder.onnx").open("ab") as encoder:
        encoder.write(b"\0")
    with pytest.raises(BundleError, match="the files were changed or corrupted"):
        load_model(bundle, "cpu")


def test_a_bundle_that_does_not_reproduce_its_golden_outputs_is_refused(bundle: Path) -> None:
    golden = dict(np.load(bundle / "golden.npz"))
    golden["recon"] = golden["recon"] + 0.5
    np.savez(bundle / "golden.npz", **golden)
    with pytest.raises(BundleError, match="golden self-test failed on CPUExecutionProvider"):
        load_model(bundle, "cpu")


def test_the_watcher_reloads_a_changed_bundle_and_keeps_serving_through_a_bad_one(
    bundle: Path,
) -> None:
    config = serve_config(bundle, watch_interval=0.05)
    with ServerThread(config) as running, Client(f"127.0.0.1:{running.port}") as client:
        registry = running.server.metrics.registry

        def reloads(result: str) -> float:
            return registry.get_sample_value("anomaly_model_reloads_total", {"result": result}) or 0

        set_version(bundle, "watched")
        wait_until(lambda: client.info().model_version == "watched", "the watcher's reload")
        assert reloads("success") == 1
        (bundle / "golden.npz").write_bytes(b"broken")
        wait_until(lambda: reloads("failure") >= 1, "the bad bundle to be refused")
        assert client.info().model_version == "watched"
        assert client.score([random_pixels(0)])[0].ok
        assert running.reload() is False  # as SIGHUP would, by hand
