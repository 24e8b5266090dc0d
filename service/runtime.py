"""ONNX Runtime: a bundle's graphs on a device (:class:`OnnxGraphs`), and the :class:`Scorer`
that turns their outputs into calibrated scores with :mod:`service.scoring`'s maths.

Used by the server, by ``training fit`` (export parity, calibration) and by ``training evaluate``
alike, so offline figures are the figures the service produces. The device policy is explicit:
``cuda`` fails when CUDA is not really usable, ``auto`` picks CUDA only when a session actually
runs on it, and the provider in use is reported.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from service.bundle import (
    COARSE_INPUT,
    COARSE_OUTPUTS,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    HEAD_INPUTS,
    HEAD_OUTPUT,
    Bundle,
    BundleError,
    Tolerance,
    load_bundle,
)
from service.scoring import (
    DecisionRule,
    F64Array,
    FloatArray,
    MapParts,
    ModelOutputs,
    ScoreBatch,
    batch_slices,
    raw_scores,
)

log = logging.getLogger(__name__)

DevicePolicy = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 when there is no driver or device."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def _cuda_unusable_reason() -> str | None:
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider"
    if cuda_device_count() == 0:
        return "no CUDA device is visible (no NVIDIA driver, or no GPU)"
    return None


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    # ORT's intra-op workers busy-wait for work between (and after) runs by default. They never
    # have the cores to themselves here (the server decodes, serves gRPC and scores in other
    # threads, often beside other processes), and a spinning worker takes the core that the
    # thread it waits on needs: 1.5-2.7x slower at batches 1-32 on a busy 2-core machine, and
    # no faster at batch 64 on a quiet one (bench/README.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _make_session(model_path: Path, provider: str, threads: int | None) -> ort.InferenceSession:
    providers: list[Any] = [CPU] if provider == CPU else [CUDA, CPU]
    return ort.InferenceSession(
        str(model_path), sess_options=_session_options(threads), providers=providers
    )


def choose_provider(device: DevicePolicy) -> str:
    """The execution provider a device policy asks for; ``cuda`` fails when CUDA is unusable."""
    if device == "cpu":
        return CPU
    reason = _cuda_unusable_reason()
    if device == "cuda":
        if reason:
            raise DeviceError(f"device 'cuda' was asked for but CUDA is not usable: {reason}")
        return CUDA
    if device != "auto":
        raise DeviceError(f"device is {device!r}; expected 'auto', 'cpu' or 'cuda'")
    if reason:
        log.info("device auto: using CPU because %s", reason)
        return CPU
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return CUDA


class OnnxGraphs:
    """The encoder, decoder and defect head of a bundle as ONNX Runtime sessions on one device.

    The one ONNX Runtime wrapper: the service scores through it, and training proves its export
    and calibrates through it, with the same session options.
    """

    def __init__(
        self,
        encoder: Path,
        decoder: Path,
        head: Path,
        coarse: Path,
        *,
        device: DevicePolicy = "auto",
        threads: int | None = None,
    ) -> None:
        self.paths = (Path(encoder), Path(decoder), Path(head), Path(coarse))
        self.provider = choose_provider(device)
        self._threads = threads
        self._sessions = self._open(self.provider)
        in_use = {session.get_providers()[0] for session in self._sessions}
        if in_use != {self.provider}:
            if device == "cuda":
                raise DeviceError(
                    f"device 'cuda' was asked for but ONNX Runtime runs on {sorted(in_use)}; "
                    "check the CUDA and cuDNN libraries (onnxruntime-gpu[cuda,cudnn])"
                )
            log.warning("CUDA session fell back to %s; serving on CPU", sorted(in_use))
            self.provider = CPU
            self._sessions = self._open(CPU)

    def _open(self, provider: str) -> tuple[ort.InferenceSession, ...]:
        try:
            return tuple(_make_session(path, provider, self._threads) for path in self.paths)
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BundleError(f"ONNX Runtime cannot load {self.paths[0].parent}: {exc}") from exc

    def run(self, batch: FloatArray) -> ModelOutputs:
        """Encoder, decoder on the latent mean, the defect head, and the coarse VAE: ``(N, C, H,
        W)`` in [0, 1]."""
        encoder, _, head, coarse = self._sessions
        mu, logvar = encoder.run(list(ENCODER_OUTPUTS), {ENCODER_INPUT: batch})
        recon = self.decode(mu)
        (defect_map,) = head.run([HEAD_OUTPUT], dict(zip(HEAD_INPUTS, (batch, recon), strict=True)))
        coarse_input, coarse_recon = coarse.run(list(COARSE_OUTPUTS), {COARSE_INPUT: batch})
        return ModelOutputs(mu, logvar, recon, defect_map, coarse_input, coarse_recon)

    def decode(self, z: FloatArray) -> FloatArray:
        """The decoder alone: latents ``(N, D)`` -> images ``(N, C, H, W)`` in [0, 1]."""
        (recon,) = self._sessions[1].run([DECODER_OUTPUT], {DECODER_INPUT: z})
        return np.asarray(recon, dtype=np.float32)

    def run_in_batches(self, images: FloatArray, batch_size: int = 32) -> ModelOutputs:
        """:meth:`run` over ``images`` in batches of ``batch_size``, outputs concatenated."""
        return ModelOutputs.joined(
            [
                self.run(np.ascontiguousarray(images[rows]))
                for rows in batch_slices(images.shape[0], batch_size)
            ]
        )


def output_differences(
    expected: ModelOutputs, actual: ModelOutputs, tolerance: Tolerance
) -> dict[str, float]:
    """Largest ``|actual - expected|`` per output; raises ValueError beyond ``tolerance``.

    The tolerance is elementwise, ``atol + rtol * |expected|``; the message names the output.
    """
    worst: dict[str, float] = {}
    for f in fields(ModelOutputs):
        want, got = getattr(expected, f.name), getattr(actual, f.name)
        if want.shape != got.shape:
            raise ValueError(f"{f.name} has shape {got.shape}, expected {want.shape}")
        diff = np.abs(got.astype(np.float64) - want)
        worst[f.name] = float(diff.max()) if diff.size else 0.0
        if np.any(diff > tolerance.atol + tolerance.rtol * np.abs(want)):
            raise ValueError(
                f"{f.name} differs by up to {worst[f.name]:.3g}, beyond the tolerance "
                f"atol={tolerance.atol}, rtol={tolerance.rtol}"
            )
    return worst


class Scorer:
    """A loaded bundle on one device: its graphs, latent reference and calibration."""

    def __init__(
        self, bundle: Bundle, *, device: DevicePolicy = "auto", threads: int | None = None
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.calibration = bundle.manifest.calibration
        self.graphs = OnnxGraphs(
            bundle.encoder_path,
            bundle.decoder_path,
            bundle.head_path,
            bundle.coarse_path,
            device=device,
            threads=threads,
        )

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider in use."""
        return self.graphs.provider

    @property
    def model_id(self) -> str:
        """Content hash of the served model."""
        return self.manifest.model_id

    def run_model(self, batch: FloatArray) -> ModelOutputs:
        """Every graph's outputs for a batch ``(N, C, H, W)`` in [0, 1]."""
        return self.graphs.run(batch)

    def decode(self, z: FloatArray) -> FloatArray:
        """The decoder alone: latents ``(N, D)`` -> images ``(N, C, H, W)`` in [0, 1]."""
        return self.graphs.decode(z)

    def score(
        self,
        batch: FloatArray,
        *,
        rule: DecisionRule | None = None,
        keep_maps: bool = False,
    ) -> ScoreBatch:
        """Score a preprocessed batch ``(N, C, H, W)``; keep anomaly maps only when asked."""
        raw, parts, _ = self.raw_scores(batch)
        return self.calibration.score(raw, rule, parts if keep_maps else None)

    def raw_scores(self, batch: FloatArray) -> tuple[dict[str, F64Array], MapParts, FloatArray]:
        """The model's part of :meth:`score`: raw scores, what anomaly maps are made of and the
        posterior means ``(N, D)``, before calibration.

        The server runs this once per batch and calibrates each request's rows with its own rule.
        """
        expected = self.manifest.input.shape
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.float32:
            raise ValueError(
                f"batch has shape {batch.shape} and dtype {batch.dtype}; expected (N, "
                f"{', '.join(map(str, expected))}) float32"
            )
        out = self.run_model(batch)
        raw, parts = raw_scores(
            batch,
            out,
            self.calibration.local_window,
            self.bundle.latent_reference,
            self.bundle.error_reference,
        )
        return raw, parts, out.mu

    def self_test(self) -> None:
        """Reproduce the golden outputs within the bundle's tolerance, or raise BundleError."""
        golden = self.bundle.golden
        expected = golden.outputs()
        try:
            actual = self.run_model(golden.inputs)
        except Exception as exc:  # ORT raises its own types for inputs a graph does not take
            message = " ".join(str(exc).split())
            raise BundleError(f"golden self-test failed on {self.provider}: {message}") from exc
        try:
            output_differences(expected, actual, self.manifest.golden_tolerance)
        except ValueError as exc:
            raise BundleError(
                f"golden self-test failed on {self.provider}: {exc}; the bundle does not "
                "reproduce what was trained"
            ) from exc


def open_scorer(path: Path, *, device: DevicePolicy = "auto", threads: int | None = None) -> Scorer:
    """Load a bundle directory or archive, open it on the device and run its golden self-test.

    Raises :class:`BundleError` or :class:`DeviceError`. An archive's unpacked files are removed
    once the ONNX Runtime sessions are open: nothing is left behind on disk.
    """
    bundle = load_bundle(path)
    try:
        scorer = Scorer(bundle, device=device, threads=threads)
        scorer.self_test()
    finally:
        bundle.remove_unpacked()
    return scorer
