"""Loading and hot reload in process: bad bundles are refused with a clear reason, the watcher
reloads a bundle that changes on disk, and the old model serves until a good one is loaded."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
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


def edit_manifest(bundle: Path, key: str, value: object) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))


def set_version(bundle: Path, version: str) -> None:
    edit_manifest(bundle, "model_version", version)


def archive(bundle: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return target


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


def test_a_calibration_that_cannot_score_is_refused_at_load(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit_manifest(bundle, "calibration", {**manifest["calibration"], "weights": {"ssim": 1.0}})
    with pytest.raises(BundleError, match="the calibration cannot score the golden inputs"):
        load_model(bundle, "cpu")


def test_a_reload_of_a_malformed_manifest_is_refused_counted_and_logged(
    bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ServerThread(serve_config(bundle)) as running:
        registry = running.server.metrics.registry
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit_manifest(bundle, "calibration", {**manifest["calibration"], "scores": []})
        with caplog.at_level(logging.ERROR, logger="service"):
            assert running.reload() is False
        failures = registry.get_sample_value("anomaly_model_reloads_total", {"result": "failure"})
        assert failures == 1
        # (the tiny bundle's start-up warning about its drift threshold is not of interest here)
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        refusal = record.getMessage()
        assert refusal.startswith("reload refused, still serving model")
        assert "manifest is malformed" in refusal and record.exc_info is None


def test_archives_leave_no_unpacked_folder_behind(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    good = archive(bundle, tmp_path / "bundle.tar.gz")
    config = serve_config(good)
    with ServerThread(config) as running, Client(f"127.0.0.1:{running.port}") as client:
        for _ in range(3):
            assert running.reload() is True
        assert client.score([random_pixels(0)])[0].ok  # served from sessions, not from files
        assert list(scratch.iterdir()) == []
        set_version(bundle, "refused")
        (bundle / "golden.npz").write_bytes(b"broken")
        archive(bundle, good)
        assert running.reload() is False
        assert list(scratch.iterdir()) == []
    assert list(scratch.iterdir()) == []
