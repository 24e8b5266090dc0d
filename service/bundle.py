"""The bundle: the one artifact between training and serving, read and written only here.

A bundle is a directory (or a ``.tar.gz`` / ``.tar`` archive of one) holding ``encoder.onnx``,
``decoder.onnx``, ``defect_head.onnx``, ``coarse.onnx``, ``latent_reference.npz``,
``error_reference.npz``, ``golden.npz`` and ``manifest.json``. The manifest describes the model
completely: input spec, latent grid, calibration, decision rule, golden tolerances and training
facts. Its ``model_id`` is a content hash of the files that decide the scores (the four graphs
and the two references), checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.preprocessing import InputSpec
from service.scoring import (
    Calibration,
    ErrorReference,
    LatentBaseline,
    LatentGrid,
    LatentReference,
    ModelOutputs,
)

# 2: a fully convolutional VAE with a latent grid, the defect head and the latent reference.
# 3: and the coarse VAE (coarse.onnx), with its coarse_error score.
# 4: the combined score is the soft maximum of the weighted standardised scores, not their sum
#    (a format-3 calibration's threshold and held-out combined scores are sums).
# 5: and the error reference (error_reference.npz): the local, defect and coarse maps are read
#    relative to normal images' mean there.
# 6: each score's calibration holds the median and the scaled median absolute deviation of its
#    held-out logs (log_centre, log_scale), not their mean and standard deviation.
# 7: and the latent reference's mean distance per cell (mean_distance): latent_distance is read
#    relative to the training images' mean distance there.
# 8: the input spec's wide_sample_bits (the bits 16-bit greyscale samples use); and a
#    normal_tail threshold is the Gaussian prediction bound of the held-out scores (format 7's
#    was their plain Gaussian quantile, which a per-request rate no longer reproduced).
# 9: a normal_tail threshold is that bound set after a Yeo-Johnson transform fitted to the
#    held-out scores (service/tail.py), which format 8's per-request rates no longer reproduce.
# 10: that transform's lambda is at most 1 (it never takes the tail for shorter than a
#    Gaussian's), so format 9's bounds from held-out scores fitted with lambda > 1 differ.
# 11: no rate gets a higher threshold than a lower one: a conformal bound above the Gaussian
#    bound at 1 / (n + 1) is set to it, so format 10's thresholds at rates just above that, the
#    default's among them where many images were held out, can differ.
FORMAT_VERSION = 11
# Formats that differ from this one only in how their threshold follows from the held-out scores
# the manifest keeps: service/upgrade.py brings them up to date without training again.
UPGRADABLE_FORMATS = (8, 9, 10)
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"
HEAD = "defect_head.onnx"
COARSE = "coarse.onnx"
LATENT_REFERENCE = "latent_reference.npz"
ERROR_REFERENCE = "error_reference.npz"
GOLDEN = "golden.npz"
BUNDLE_FILES = (
    MANIFEST,
    ENCODER,
    DECODER,
    HEAD,
    COARSE,
    LATENT_REFERENCE,
    ERROR_REFERENCE,
    GOLDEN,
)
# The files whose content decides the scores, hashed into the model id.
MODEL_FILES = (ENCODER, DECODER, HEAD, COARSE, LATENT_REFERENCE, ERROR_REFERENCE)
ENCODER_INPUT = "image"
ENCODER_OUTPUTS = ("mu", "logvar")
DECODER_INPUT = "z"
DECODER_OUTPUT = "recon"
HEAD_INPUTS = ("image", "recon")
HEAD_OUTPUT = "defect_map"
COARSE_INPUT = "image"
COARSE_OUTPUTS = ("coarse_input", "coarse_recon")
GOLDEN_ARRAYS = ("inputs", "mu", "logvar", "recon", "defect_map", *COARSE_OUTPUTS)
# The error reference's arrays are its fields, by name.
ERROR_ARRAYS = tuple(f.name for f in fields(ErrorReference))


class BundleError(RuntimeError):
    """A bundle that is missing, corrupt, inconsistent or fails its self-test."""


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed difference between expected and observed outputs: ``atol + rtol*|exp|``."""

    atol: float
    rtol: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"atol": self.atol, "rtol": self.rtol}


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json``."""

    model_id: str
    model_version: str
    created_at: str
    input: InputSpec
    latent: LatentGrid
    calibration: Calibration
    golden_tolerance: Tolerance
    training: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def latent_dim(self) -> int:
        """``D``, the length of a posterior mean."""
        return self.latent.size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format_version": self.format_version,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "files": {
                "encoder": ENCODER,
                "decoder": DECODER,
                "defect_head": HEAD,
                "coarse": COARSE,
                "latent_reference": LATENT_REFERENCE,
                "error_reference": ERROR_REFERENCE,
                "golden": GOLDEN,
            },
            "graph": {
                "encoder": {"inputs": [ENCODER_INPUT], "outputs": list(ENCODER_OUTPUTS)},
                "decoder": {"inputs": [DECODER_INPUT], "outputs": [DECODER_OUTPUT]},
                "defect_head": {"inputs": list(HEAD_INPUTS), "outputs": [HEAD_OUTPUT]},
                "coarse": {"inputs": [COARSE_INPUT], "outputs": list(COARSE_OUTPUTS)},
            },
            "input": self.input.to_dict(),
            "latent_dim": self.latent.size,
            "latent_grid": {
                "channels": self.latent.channels,
                "rows": self.latent.rows,
                "columns": self.latent.columns,
                "layout": "mu[n, (c * rows + r) * columns + q] is channel c of the cell at row r, "
                "column q",
            },
            "calibration": self.calibration.to_dict(),
            "golden_tolerance": self.golden_tolerance.to_dict(),
            "training": dict(self.training),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse a manifest; raises :class:`BundleError` naming what is wrong."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            hint = ""
            if type(version) is int and version in UPGRADABLE_FORMATS:
                hint = (
                    "; it was written by an older release: upgrade it without training again "
                    "with `python -m service.upgrade BUNDLE --out NEW_BUNDLE`"
                )
            elif isinstance(version, int) and version < FORMAT_VERSION:
                hint = (
                    "; it was written by an older release: train it again with "
                    "`python -m training fit`"
                )
            raise BundleError(
                f"manifest format_version is {version!r}; this software reads {FORMAT_VERSION}"
                + hint
            )
        try:
            tolerance = data["golden_tolerance"]
            return cls(
                model_id=str(data["model_id"]),
                model_version=str(data["model_version"]),
                created_at=str(data["created_at"]),
                input=InputSpec.from_dict(data["input"]),
                latent=_latent_grid(data["latent_grid"], int(data["latent_dim"])),
                calibration=Calibration.from_dict(data["calibration"]),
                golden_tolerance=Tolerance(float(tolerance["atol"]), float(tolerance["rtol"])),
                training=dict(data.get("training", {})),
                format_version=int(version),
            )
        except Exception as exc:  # JSON of any wrong shape: a list for an object, inf for an int
            raise BundleError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def _latent_grid(data: Mapping[str, Any], latent_dim: int) -> LatentGrid:
    grid = LatentGrid(int(data["channels"]), int(data["rows"]), int(data["columns"]))
    if min(grid.channels, grid.rows, grid.columns) < 1 or grid.size != latent_dim:
        raise ValueError(
            f"latent grid {grid.channels}x{grid.rows}x{grid.columns} does not give latent_dim "
            f"{latent_dim}"
        )
    return grid


@dataclass(frozen=True)
class Golden:
    """Reference inputs with the outputs the model must reproduce when loaded."""

    inputs: npt.NDArray[np.float32]
    mu: npt.NDArray[np.float32]
    logvar: npt.NDArray[np.float32]
    recon: npt.NDArray[np.float32]
    defect_map: npt.NDArray[np.float32]
    coarse_input: npt.NDArray[np.float32]
    coarse_recon: npt.NDArray[np.float32]

    def outputs(self) -> ModelOutputs:
        """The expected outputs of every graph for :attr:`inputs`."""
        return ModelOutputs(
            self.mu, self.logvar, self.recon, self.defect_map, self.coarse_input, self.coarse_recon
        )

    @classmethod
    def of(cls, inputs: npt.NDArray[np.float32], out: ModelOutputs) -> Golden:
        """Golden vectors from inputs and the graphs' outputs for them."""
        return cls(inputs, *(getattr(out, f.name) for f in fields(ModelOutputs)))


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose files exist and whose hash matches its manifest."""

    path: Path
    manifest: Manifest
    golden: Golden
    latent_reference: LatentReference
    latent_baseline: LatentBaseline
    error_reference: ErrorReference
    # The temporary folder an archive was unpacked into (``path`` lies in it); None for a directory.
    unpacked_into: Path | None = None

    def remove_unpacked(self) -> None:
        """Delete the folder an archive was unpacked into (ONNX Runtime sessions already opened
        on its files keep working); nothing for a bundle directory."""
        if self.unpacked_into is not None:
            shutil.rmtree(self.unpacked_into, ignore_errors=True)

    @property
    def encoder_path(self) -> Path:
        """Path of ``encoder.onnx``."""
        return self.path / ENCODER

    @property
    def decoder_path(self) -> Path:
        """Path of ``decoder.onnx``."""
        return self.path / DECODER

    @property
    def head_path(self) -> Path:
        """Path of ``defect_head.onnx``."""
        return self.path / HEAD

    @property
    def coarse_path(self) -> Path:
        """Path of ``coarse.onnx``."""
        return self.path / COARSE


def compute_model_id(bundle_dir: Path) -> str:
    """Content hash identifying a model: 16 hex digits of SHA-256 over its MODEL_FILES."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(hashlib.sha256((Path(bundle_dir) / name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def write_golden(path: Path, golden: Golden) -> None:
    """Write golden vectors to ``path`` (an .npz file)."""
    np.savez(path, **{name: getattr(golden, name) for name in GOLDEN_ARRAYS})


def write_latent_reference(
    path: Path, reference: LatentReference, baseline: LatentBaseline
) -> None:
    """Write the latent reference and baseline to ``path`` (an .npz file)."""
    np.savez(
        path,
        mean=reference.mean,
        precision=reference.precision,
        mean_distance=reference.mean_distance,
        baseline_mean=baseline.mean,
        baseline_std=baseline.std,
        baseline_count=np.array(baseline.count),
    )


def _read_arrays(
    path: Path, what: str, expected: Mapping[str, tuple[int, ...]], source: str
) -> dict[str, npt.NDArray[np.float64]]:
    """The arrays of an .npz reference file, each checked for its shape and finiteness."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name], dtype=np.float64) for name in expected}
    except Exception as exc:
        raise BundleError(f"cannot read the {what} {path}: {exc}") from exc
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise BundleError(
                f"{what} {path}: {name} has shape {arrays[name].shape}; {source} expects {shape}"
            )
        if not np.all(np.isfinite(arrays[name])):
            raise BundleError(f"{what} {path}: {name} holds values that are not finite")
    return arrays


def _read_latent_reference(path: Path, grid: LatentGrid) -> tuple[LatentReference, LatentBaseline]:
    expected = {
        "mean": (grid.cells, grid.channels),
        "precision": (grid.cells, grid.channels, grid.channels),
        "mean_distance": (grid.rows, grid.columns),
        "baseline_mean": (grid.size,),
        "baseline_std": (grid.size,),
        "baseline_count": (),
    }
    arrays = _read_arrays(path, "latent reference", expected, "the manifest's latent grid")
    count = int(arrays["baseline_count"])
    if count < 2 or np.any(arrays["baseline_std"] < 0):
        raise BundleError(f"latent reference {path}: the baseline is not a valid spread")
    if np.any(arrays["mean_distance"] < 0):
        raise BundleError(f"latent reference {path}: mean_distance holds negative values")
    return (
        LatentReference(grid, arrays["mean"], arrays["precision"], arrays["mean_distance"]),
        LatentBaseline(arrays["baseline_mean"], arrays["baseline_std"], count),
    )


def write_error_reference(path: Path, reference: ErrorReference) -> None:
    """Write the error reference to ``path`` (an .npz file)."""
    np.savez(path, **{name: getattr(reference, name) for name in ERROR_ARRAYS})


def _read_error_reference(path: Path, spec: InputSpec, coarse: tuple[int, int]) -> ErrorReference:
    expected = {
        "squared_error": (spec.height, spec.width),
        "defect_map": (spec.height, spec.width),
        "coarse_error": coarse,
    }
    arrays = _read_arrays(path, "error reference", expected, "the input and the coarse model")
    for name, values in arrays.items():
        if np.any(values < 0):
            raise BundleError(f"error reference {path}: {name} holds negative values")
    return ErrorReference(**arrays)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` into a bundle directory."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False)
    (Path(bundle_dir) / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _read_golden(path: Path) -> Golden:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in GOLDEN_ARRAYS if name not in data]
            if missing:
                raise BundleError(f"{path} lacks arrays {missing}")
            arrays = {name: np.asarray(data[name], dtype=np.float32) for name in GOLDEN_ARRAYS}
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"cannot read golden vectors {path}: {exc}") from exc
    return Golden(**arrays)


def _unpack_archive(archive: Path, target: Path) -> Path:
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"cannot unpack bundle archive {archive}: {exc}") from exc
    if (target / MANIFEST).is_file():
        return target
    children = [p for p in target.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / MANIFEST).is_file():
        return children[0]
    raise BundleError(f"bundle archive {archive} holds no {MANIFEST} at its top level")


def load_bundle(path: Path) -> Bundle:
    """Open a bundle directory or archive and check its files and content hash.

    An archive is unpacked into a temporary folder, removed again if the bundle is refused;
    the caller removes it with :meth:`Bundle.remove_unpacked` once done with the files.
    The golden self-test needs ONNX Runtime and is run by :mod:`service.runtime`.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist")
    if not path.is_file():
        return _load_directory(path)
    target = Path(tempfile.mkdtemp(prefix="bundle-"))
    try:
        return replace(_load_directory(_unpack_archive(path, target)), unpacked_into=target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def read_manifest_json(path: Path) -> dict[str, Any]:
    """The manifest of the bundle directory ``path`` as JSON, of whatever format; raises
    :class:`BundleError` where it is missing or not a JSON object."""
    if not (path / MANIFEST).is_file():
        raise BundleError(f"bundle {path} lacks {MANIFEST}")
    try:
        raw = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"cannot read {path / MANIFEST}: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path / MANIFEST} is not a JSON object")
    return raw


def _load_directory(path: Path) -> Bundle:
    # The format first: an old bundle is told what to do before anything else is checked.
    manifest = Manifest.from_dict(read_manifest_json(path))
    for name in BUNDLE_FILES:
        if not (path / name).is_file():
            raise BundleError(f"bundle {path} lacks {name}")
    actual = compute_model_id(path)
    if actual != manifest.model_id:
        raise BundleError(
            f"bundle {path}: its model files hash to {actual} but the manifest says "
            f"{manifest.model_id}; the files were changed or corrupted after export"
        )
    golden = _read_golden(path / GOLDEN)
    n = golden.inputs.shape[0]
    spec = manifest.input
    for name, expected in (
        ("inputs", (n, *spec.shape)),
        ("mu", (n, manifest.latent_dim)),
        ("logvar", (n, manifest.latent_dim)),
        ("recon", (n, *spec.shape)),
        ("defect_map", (n, spec.height, spec.width)),
    ):
        if getattr(golden, name).shape != expected:
            raise BundleError(
                f"golden {name} have shape {getattr(golden, name).shape}; the manifest's input "
                f"spec and latent grid expect {expected}"
            )
    coarse = golden.coarse_input.shape
    if (
        len(coarse) != 4
        or coarse[:2] != (n, spec.channels)
        or golden.coarse_recon.shape != coarse
        or spec.height % coarse[2]
        or spec.height // coarse[2] * coarse[3] != spec.width
    ):
        raise BundleError(
            f"golden coarse_input and coarse_recon have shapes {coarse} and "
            f"{golden.coarse_recon.shape}; expected ({n}, {spec.channels}, H/f, W/f) each, for "
            f"the input of {spec.height}x{spec.width} downsampled by a whole factor f"
        )
    reference, baseline = _read_latent_reference(path / LATENT_REFERENCE, manifest.latent)
    errors = _read_error_reference(path / ERROR_REFERENCE, spec, (coarse[2], coarse[3]))
    return Bundle(path, manifest, golden, reference, baseline, errors)
