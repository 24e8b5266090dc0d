"""The bundle contract (service/bundle.py) and the scorer's self-test and device policy."""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import (
    BUNDLE_FILES,
    COARSE,
    ERROR_ARRAYS,
    ERROR_REFERENCE,
    FORMAT_VERSION,
    GOLDEN,
    HEAD,
    LATENT_REFERENCE,
    MANIFEST,
    MODEL_FILES,
    UPGRADABLE_FORMATS,
    BundleError,
    Golden,
    compute_model_id,
    load_bundle,
    write_error_reference,
    write_golden,
    write_latent_reference,
)
from service.runtime import CPU, DeviceError, Scorer, cuda_device_count
from service.scoring import (
    SCORE_NAMES,
    ErrorReference,
    LatentReference,
    ModelOutputs,
    anomaly_map,
)


@pytest.fixture()
def bundle_copy(trained_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(trained_bundle, copy)
    return copy


def _edit_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_a_trained_bundle_loads_and_passes_its_self_test(trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    scorer = Scorer(bundle, device="cpu")
    scorer.self_test()
    assert scorer.provider == CPU
    scored = scorer.score(bundle.golden.inputs, keep_maps=True)
    assert scored.anomaly_map is not None
    assert scored.anomaly_map.shape == (len(bundle.golden.inputs), *bundle.manifest.input.shape[1:])
    assert np.all((scored.combined_p_value > 0) & (scored.combined_p_value <= 1))
    assert set(scored.raw) == set(scored.p_values) == set(SCORE_NAMES)
    # The anomaly map is the combined score at every pixel, made from the model's outputs.
    raw, parts, _ = scorer.raw_scores(bundle.golden.inputs)
    expected = bundle.manifest.calibration.anomaly_map(raw, parts)
    np.testing.assert_array_equal(scored.anomaly_map, expected)
    golden = bundle.golden
    relative = bundle.error_reference.relative(
        anomaly_map(golden.inputs, golden.recon),
        golden.defect_map,
        anomaly_map(golden.coarse_input, golden.coarse_recon),
    )
    for part, expected_part in zip(
        (parts.squared_error, parts.defect_map, parts.coarse_error), relative, strict=True
    ):
        np.testing.assert_allclose(part, expected_part, rtol=1e-4, atol=1e-5)
    assert bundle.latent_reference.grid == bundle.manifest.latent


def test_an_archived_bundle_loads_like_the_directory(trained_bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(trained_bundle, arcname="bundle")
    assert load_bundle(archive).manifest == load_bundle(trained_bundle).manifest


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_a_missing_file_is_named(bundle_copy: Path, name: str) -> None:
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"lacks {name}"):
        load_bundle(bundle_copy)


def test_a_changed_onnx_file_is_refused_by_its_hash(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="changed or corrupted after export"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_the_model_id_covers_every_model_file(bundle_copy: Path, name: str) -> None:
    before = compute_model_id(bundle_copy)
    data = bytearray((bundle_copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / name).write_bytes(bytes(data))
    assert compute_model_id(bundle_copy) != before


def test_the_model_id_ignores_the_manifest_and_golden(bundle_copy: Path) -> None:
    before = compute_model_id(bundle_copy)
    _edit_manifest(bundle_copy, model_version="renamed")
    golden = load_bundle(bundle_copy).golden
    write_golden(bundle_copy / GOLDEN, Golden(*(a[:2] for a in _golden_arrays(golden))))
    assert compute_model_id(bundle_copy) == before
    assert len(load_bundle(bundle_copy).golden.inputs) == 2


def test_a_changed_latent_reference_is_refused_by_the_model_id(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    reference = bundle.latent_reference
    shifted = LatentReference(
        reference.grid, reference.mean + 0.5, reference.precision, reference.mean_distance
    )
    write_latent_reference(bundle_copy / LATENT_REFERENCE, shifted, bundle.latent_baseline)
    with pytest.raises(BundleError, match="changed or corrupted after export"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("local shape", "error reference .*: squared_error has shape"),
        ("coarse shape", "error reference .*: coarse_error has shape"),
        ("negative", "error reference .*: defect_map holds negative values"),
        ("not an npz", "cannot read the error reference"),
    ],
)
def test_a_bad_error_reference_is_refused(bundle_copy: Path, change: str, match: str) -> None:
    errors = load_bundle(bundle_copy).error_reference
    path = bundle_copy / ERROR_REFERENCE
    if change == "not an npz":
        path.write_bytes(b"not an npz file")
    else:
        arrays = {name: getattr(errors, name) for name in ERROR_ARRAYS}
        if change == "local shape":
            arrays["squared_error"] = arrays["squared_error"][:-1]
        elif change == "coarse shape":
            arrays["coarse_error"] = arrays["coarse_error"][:, :-1]
        else:
            arrays["defect_map"] = -arrays["defect_map"]
        write_error_reference(path, ErrorReference(**arrays))
    _rehash(bundle_copy)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def _golden_arrays(golden: Golden) -> tuple[np.ndarray, ...]:
    return (golden.inputs, *(getattr(golden.outputs(), f.name) for f in fields(ModelOutputs)))


def _rehash(bundle: Path) -> None:
    """Make the manifest's model id match the files again, as a re-export would."""
    _edit_manifest(bundle, model_id=compute_model_id(bundle))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("mean shape", "latent reference .*: mean has shape"),
        ("precision shape", "latent reference .*: precision has shape"),
        ("baseline shape", "latent reference .*: baseline_std has shape"),
        ("distance shape", "latent reference .*: mean_distance has shape"),
        ("missing distance", "cannot read the latent reference"),
        ("not finite", "not finite"),
        ("negative spread", "not a valid spread"),
        ("negative distance", "mean_distance holds negative values"),
        ("not an npz", "cannot read the latent reference"),
    ],
)
def test_a_bad_latent_reference_is_refused(bundle_copy: Path, change: str, match: str) -> None:
    bundle = load_bundle(bundle_copy)
    reference, baseline = bundle.latent_reference, bundle.latent_baseline
    mean, precision, std = reference.mean, reference.precision, baseline.std
    distance: np.ndarray | None = reference.mean_distance
    path = bundle_copy / LATENT_REFERENCE
    if change == "mean shape":
        mean = mean[:-1]
    elif change == "precision shape":
        precision = precision[:, :1, :1]
    elif change == "baseline shape":
        std = std[:-1]
    elif change == "not finite":
        mean = mean.copy()
        mean[0, 0] = np.nan
    elif change == "negative spread":
        std = -std
    elif change == "distance shape":
        distance = reference.mean_distance[:-1]
    elif change == "missing distance":  # a format-6 reference
        distance = None
    elif change == "negative distance":
        distance = -reference.mean_distance - 1.0
    if change == "not an npz":
        path.write_bytes(b"not an npz file")
    else:
        arrays: dict[str, Any] = {
            "mean": mean,
            "precision": precision,
            "baseline_mean": baseline.mean,
            "baseline_std": std,
            "baseline_count": np.array(baseline.count),
        }
        if distance is not None:
            arrays["mean_distance"] = distance
        np.savez(path, **arrays)
    _rehash(bundle_copy)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("old", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
def test_an_older_bundle_is_refused_saying_to_retrain_or_upgrade(
    bundle_copy: Path, old: int
) -> None:
    _edit_manifest(bundle_copy, format_version=old)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert f"format_version is {old}; this software reads {FORMAT_VERSION}" in message
    if old in UPGRADABLE_FORMATS:
        assert "upgrade it without training again with `python -m service.upgrade" in message
    else:
        assert "train it again with `python -m training fit`" in message


def test_a_format_2_bundle_without_the_coarse_vae_gets_the_retrain_message(
    bundle_copy: Path,
) -> None:
    """A real format-2 bundle has no coarse.onnx."""
    (bundle_copy / COARSE).unlink()
    _edit_manifest(bundle_copy, format_version=2)
    with pytest.raises(BundleError, match="train it again"):
        load_bundle(bundle_copy)


def test_a_format_1_bundle_without_the_new_files_gets_the_retrain_message(
    bundle_copy: Path,
) -> None:
    """A real format-1 bundle has no defect head and no latent reference."""
    (bundle_copy / HEAD).unlink()
    (bundle_copy / LATENT_REFERENCE).unlink()
    _edit_manifest(bundle_copy, format_version=1)
    with pytest.raises(BundleError, match="train it again"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 99}, "format_version is 99; this software reads 11$"),
        ({"latent_grid": {"channels": 2, "rows": 3, "columns": 4}}, "does not give latent_dim"),
        ({"latent_grid": {"channels": 2}}, "manifest is malformed"),
        ({"latent_dim": "many"}, "manifest is malformed"),
        ({"calibration": {}}, "manifest is malformed"),
    ],
)
def test_a_bad_manifest_is_refused_with_the_reason(
    bundle_copy: Path, changes: dict[str, object], match: str
) -> None:
    _edit_manifest(bundle_copy, **changes)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def _leaves(node: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a JSON object, inner objects included."""
    if not isinstance(node, dict):
        return [path]
    inner = [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    return [path, *inner] if path else inner


WRONG_VALUES = [[], ["x"], "x", None, {}, {"x": 1}, float("inf"), -1, 1e308]


def test_every_malformed_manifest_is_a_bundle_error(bundle_copy: Path) -> None:
    # Every key of the manifest (but the free-form training facts) set to values of the wrong
    # type or range: the bundle loads, or it is refused with a BundleError, never another error.
    original = json.loads((bundle_copy / MANIFEST).read_text())
    paths = [p for p in _leaves(original) if p[0] != "training"]
    assert ("calibration", "scores") in paths and len(paths) > 20
    refused = 0
    for path in paths:
        for wrong in WRONG_VALUES:
            manifest = json.loads(json.dumps(original))
            node = manifest
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = wrong
            (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
            try:
                load_bundle(bundle_copy)
            except BundleError:
                refused += 1
    assert refused > len(paths)


@pytest.mark.parametrize(
    "calibration",
    [{"scores": [], "weights": {}}, {"scores": ["recon_error"]}, []],
    ids=["scores-list", "scores-list-of-names", "calibration-list"],
)
def test_a_calibration_of_the_wrong_type_is_refused(bundle_copy: Path, calibration: object) -> None:
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    if isinstance(calibration, dict):
        manifest["calibration"].update(calibration)
    else:
        manifest["calibration"] = calibration
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest is malformed"):
        load_bundle(bundle_copy)


def test_a_bundle_that_drifted_from_its_golden_outputs_is_refused(bundle_copy: Path) -> None:
    golden = load_bundle(bundle_copy).golden
    drifted = replace(golden, recon=golden.recon + 0.05)
    write_golden(bundle_copy / GOLDEN, drifted)
    scorer = Scorer(load_bundle(bundle_copy), device="cpu")
    with pytest.raises(BundleError, match="golden self-test failed on CPUExecutionProvider: recon"):
        scorer.self_test()
    head_drift = replace(golden, defect_map=1 - golden.defect_map)
    write_golden(bundle_copy / GOLDEN, head_drift)
    with pytest.raises(BundleError, match="CPUExecutionProvider: defect_map differs"):
        Scorer(load_bundle(bundle_copy), device="cpu").self_test()
    coarse_drift = replace(golden, coarse_recon=golden.coarse_recon + 0.05)
    write_golden(bundle_copy / GOLDEN, coarse_drift)
    with pytest.raises(BundleError, match="CPUExecutionProvider: coarse_recon differs"):
        Scorer(load_bundle(bundle_copy), device="cpu").self_test()


def test_a_golden_of_the_wrong_shape_is_refused(bundle_copy: Path) -> None:
    golden = load_bundle(bundle_copy).golden
    write_golden(bundle_copy / GOLDEN, replace(golden, inputs=golden.inputs[:, :, :-1]))
    with pytest.raises(BundleError, match="golden inputs have shape"):
        load_bundle(bundle_copy)
    coarse = golden.coarse_input
    write_golden(bundle_copy / GOLDEN, replace(golden, coarse_input=coarse[:, :, :, :-1]))
    with pytest.raises(BundleError, match="golden coarse_input and coarse_recon have shapes"):
        load_bundle(bundle_copy)


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_cuda_policy_fails_loudly_without_a_gpu_and_auto_reports_cpu(trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    with pytest.raises(DeviceError, match="device 'cuda' was asked for but CUDA is not usable"):
        Scorer(bundle, device="cuda")
    assert Scorer(bundle, device="auto").provider == CPU


@pytest.mark.gpu
def test_cuda_policy_runs_on_the_gpu_and_reproduces_the_golden_outputs(
    trained_bundle: Path,
) -> None:
    scorer = Scorer(load_bundle(trained_bundle), device="cuda")
    assert scorer.provider == "CUDAExecutionProvider"
    scorer.self_test()


def test_the_combined_score_histogram_resolves_good_parts_and_the_threshold(
    trained_bundle: Path,
) -> None:
    """The dashboard's histogram of combined scores has buckets where a model's good parts and
    its threshold lie, not one or two buckets for all of them."""
    from service.metrics import COMBINED_SCORE_BUCKETS

    calibration = load_bundle(trained_bundle).manifest.calibration
    lowest, threshold = min(calibration.combined.values), calibration.rule.threshold
    assert COMBINED_SCORE_BUCKETS[0] < lowest and threshold < COMBINED_SCORE_BUCKETS[-1]
    between = [edge for edge in COMBINED_SCORE_BUCKETS if lowest <= edge <= threshold]
    assert len(between) >= 3, (lowest, threshold)


def test_the_outliers_left_out_reach_model_info(bundle_copy: Path) -> None:
    """The tiny test bundle leaves none out; a manifest that records three is reported as such."""
    from service.drift import DriftSettings
    from service.model_slot import load_model
    from service.wire import Limits, model_info

    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["calibration"]["rule"]["outliers"] = 3
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    model = load_model(bundle_copy, "cpu")
    assert model.scorer.calibration.rule.outliers == 3
    info = model_info(model, Limits(8, 1 << 20, 1 << 22), DriftSettings(window=0))
    assert info.default_rule.outliers_left_out == 3
