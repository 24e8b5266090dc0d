"""ONNX export that proves itself: export, check the graph, compare ONNX Runtime with PyTorch.

A model whose ONNX Runtime outputs differ from PyTorch's beyond :data:`PARITY_TOLERANCE` on real
inputs is refused: :func:`export_model` raises :class:`ExportError` and nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from service.bundle import (
    DECODER,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    Tolerance,
)
from training.errors import ExportError
from training.model import VAE

F32Array = npt.NDArray[np.float32]

# ORT (CPU) against PyTorch on the same inputs: both fp32, differing only in kernel order.
PARITY_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
# What a loaded bundle must reproduce on any device, CUDA included (TF32 convolutions there
# differ from fp32 by about 1e-3 relative); a changed model or graph misses it by far more.
GOLDEN_TOLERANCE = Tolerance(atol=2e-3, rtol=1e-2)
OPSET = 18


@dataclass(frozen=True)
class OnnxOutputs:
    """Encoder and decoder outputs of ONNX Runtime for one batch."""

    mu: F32Array
    logvar: F32Array
    recon: F32Array


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute ORT-vs-torch difference per output, and the tolerance it met."""

    max_abs_diff: dict[str, float]
    tolerance: Tolerance
    n_inputs: int

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance.to_dict(),
            "n_inputs": self.n_inputs,
        }


class OnnxModel:
    """The exported encoder and decoder under ONNX Runtime on CPU."""

    def __init__(self, encoder_path: Path, decoder_path: Path, *, threads: int | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(str(encoder_path), options, providers=providers)
        self._decoder = ort.InferenceSession(str(decoder_path), options, providers=providers)

    def run(self, images: F32Array, batch_size: int = 32) -> OnnxOutputs:
        """Encoder, then decoder on the latent mean, in batches."""
        parts: list[tuple[F32Array, F32Array, F32Array]] = []
        for start in range(0, images.shape[0], batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size])
            mu, logvar = self._encoder.run(list(ENCODER_OUTPUTS), {ENCODER_INPUT: batch})
            (recon,) = self._decoder.run([DECODER_OUTPUT], {DECODER_INPUT: mu})
            parts.append((mu, logvar, recon))
        return OnnxOutputs(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress logging and deprecation chatter for its duration."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_one(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
) -> None:
    # The TorchScript exporter: these are static convolutional graphs that it traces exactly, in
    # well under a second, where the torch.export-based one takes 5-20 s per graph on a small
    # CPU. Either way the graph must pass the checker and the parity test below.
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=output_names,
        dynamic_axes={name: {0: "batch"} for name in (input_name, *output_names)},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def export_model(
    model: VAE, out_dir: Path, examples: F32Array, *, threads: int | None = None
) -> tuple[OnnxModel, ParityReport]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` into ``out_dir``, check them, prove parity.

    ``examples`` are real preprocessed images (at least two, so the batch axis is exercised).
    """
    model = model.cpu().eval()
    encoder_path, decoder_path = out_dir / ENCODER, out_dir / DECODER
    x = torch.from_numpy(np.ascontiguousarray(examples))
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        recon = model.decoder(mu)
    try:
        with _quiet_exporter():
            _export_one(model.encoder, x[:2], encoder_path, ENCODER_INPUT, list(ENCODER_OUTPUTS))
            _export_one(model.decoder, mu[:2], decoder_path, DECODER_INPUT, [DECODER_OUTPUT])
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    for path in (encoder_path, decoder_path):
        try:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        except Exception as exc:
            raise ExportError(f"the ONNX checker rejects {path}: {exc}") from exc
    onnx_model = OnnxModel(encoder_path, decoder_path, threads=threads)
    # Batches of several sizes: the dynamic axis must really be dynamic.
    outputs = onnx_model.run(examples, batch_size=max(1, examples.shape[0] // 2 + 1))
    expected = {"mu": mu.numpy(), "logvar": logvar.numpy(), "recon": recon.numpy()}
    report = compare(expected, outputs, PARITY_TOLERANCE, n_inputs=examples.shape[0])
    return onnx_model, report


def compare(
    expected: dict[str, F32Array], actual: OnnxOutputs, tolerance: Tolerance, *, n_inputs: int
) -> ParityReport:
    """Check ``|actual - expected| <= atol + rtol * |expected|`` elementwise, else ExportError."""
    diffs: dict[str, float] = {}
    for name, want in expected.items():
        got = getattr(actual, name)
        if got.shape != want.shape:
            raise ExportError(
                f"ONNX Runtime output {name} has shape {got.shape}; PyTorch gives {want.shape}"
            )
        diff = np.abs(got - want)
        diffs[name] = float(diff.max())
        if np.any(diff > tolerance.atol + tolerance.rtol * np.abs(want)):
            raise ExportError(
                f"ONNX Runtime output {name} differs from PyTorch by up to {diffs[name]:.3g} on "
                f"{n_inputs} real inputs, beyond the tolerance atol={tolerance.atol}, "
                f"rtol={tolerance.rtol}; refusing to write the bundle"
            )
    return ParityReport(diffs, tolerance, n_inputs)
