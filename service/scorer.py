"""Runs a bundle under ONNX Runtime and scores preprocessed batches.

Used by the server and by ``training evaluate`` alike, so offline figures are the figures the
service produces. The device policy is explicit: ``cuda`` fails when CUDA is not really usable,
``auto`` picks CUDA only when a session actually runs on it, and the provider in use is reported.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.bundle import (
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    Bundle,
    BundleError,
)
from service.scoring import DecisionRule, F64Array, ScoreBatch, raw_scores

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


def _make_session(model_path: str, provider: str, threads: int | None) -> ort.InferenceSession:
    providers: list[Any] = [CPU] if provider == CPU else [CUDA, CPU]
    return ort.InferenceSession(
        model_path, sess_options=_session_options(threads), providers=providers
    )


@dataclass(frozen=True)
class ModelOutputs:
    """Raw outputs of encoder and decoder for one batch."""

    mu: npt.NDArray[np.float32]
    logvar: npt.NDArray[np.float32]
    recon: npt.NDArray[np.float32]


class Scorer:
    """A loaded bundle on one device: encoder and decoder sessions plus the scoring maths."""

    def __init__(
        self, bundle: Bundle, *, device: DevicePolicy = "auto", threads: int | None = None
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.calibration = bundle.manifest.calibration
        self.provider = self._choose_provider(device)
        try:
            self._encoder = _make_session(str(bundle.encoder_path), self.provider, threads)
            self._decoder = _make_session(str(bundle.decoder_path), self.provider, threads)
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BundleError(f"ONNX Runtime cannot load bundle {bundle.path}: {exc}") from exc
        in_use = {self._encoder.get_providers()[0], self._decoder.get_providers()[0]}
        if in_use != {self.provider}:
            if device == "cuda":
                raise DeviceError(
                    f"device 'cuda' was asked for but ONNX Runtime runs on {sorted(in_use)}; "
                    "check the CUDA and cuDNN libraries (onnxruntime-gpu[cuda,cudnn])"
                )
            log.warning("CUDA session fell back to %s; serving on CPU", sorted(in_use))
            self.provider = CPU
            self._encoder = _make_session(str(bundle.encoder_path), CPU, threads)
            self._decoder = _make_session(str(bundle.decoder_path), CPU, threads)

    @staticmethod
    def _choose_provider(device: DevicePolicy) -> str:
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

    @property
    def model_id(self) -> str:
        """Content hash of the served model."""
        return self.manifest.model_id

    def run_model(self, batch: npt.NDArray[np.float32]) -> ModelOutputs:
        """Encoder then decoder on the latent mean: ``(N, C, H, W)`` in [0, 1]."""
        mu, logvar = self._encoder.run(list(ENCODER_OUTPUTS), {ENCODER_INPUT: batch})
        return ModelOutputs(mu=mu, logvar=logvar, recon=self.decode(mu))

    def decode(self, z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The decoder alone: latents ``(N, D)`` -> images ``(N, C, H, W)`` in [0, 1]."""
        (recon,) = self._decoder.run([DECODER_OUTPUT], {DECODER_INPUT: z})
        return np.asarray(recon, dtype=np.float32)

    def score(
        self,
        batch: npt.NDArray[np.float32],
        *,
        rule: DecisionRule | None = None,
        keep_maps: bool = False,
    ) -> ScoreBatch:
        """Score a preprocessed batch ``(N, C, H, W)``; keep anomaly maps only when asked."""
        raw, amap = self.raw_scores(batch)
        return self.calibration.score(raw, rule, amap if keep_maps else None)

    def raw_scores(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[dict[str, F64Array], npt.NDArray[np.float32]]:
        """The model's part of :meth:`score`: raw scores and anomaly maps, before calibration.

        The server runs this once per batch and calibrates each request's rows with its own rule.
        """
        expected = self.manifest.input.shape
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.dtype != np.float32:
            raise ValueError(
                f"batch has shape {batch.shape} and dtype {batch.dtype}; expected (N, "
                f"{', '.join(map(str, expected))}) float32"
            )
        out = self.run_model(batch)
        return raw_scores(batch, out.mu, out.logvar, out.recon, self.calibration.local_window)

    def self_test(self) -> None:
        """Reproduce the golden outputs within the bundle's tolerance, or raise BundleError."""
        golden = self.bundle.golden
        tol = self.manifest.golden_tolerance
        out = self.run_model(golden.inputs)
        for name, expected, actual in (
            ("mu", golden.mu, out.mu),
            ("logvar", golden.logvar, out.logvar),
            ("recon", golden.recon, out.recon),
        ):
            if expected.shape != actual.shape:
                raise BundleError(
                    f"golden self-test: {name} has shape {actual.shape}, expected {expected.shape}"
                )
            excess = np.abs(actual - expected) - (tol.atol + tol.rtol * np.abs(expected))
            if np.any(excess > 0):
                worst = float(np.max(np.abs(actual - expected)))
                raise BundleError(
                    f"golden self-test failed on {self.provider}: {name} differs from the "
                    f"exported reference by up to {worst:.3g} (tolerance atol={tol.atol}, "
                    f"rtol={tol.rtol}); the bundle does not reproduce what was trained"
                )
