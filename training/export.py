"""ONNX export that proves itself: export, check the graphs, compare ONNX Runtime with PyTorch.

The encoder, decoder, defect head and coarse VAE are exported at the bundle's input size. A model
whose ONNX Runtime outputs (through the service's own :class:`OnnxGraphs`) differ from PyTorch's
beyond :data:`PARITY_TOLERANCE` on real inputs is refused: :func:`export_model` raises
:class:`ExportError` and nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch

from service.bundle import (
    COARSE,
    COARSE_INPUT,
    COARSE_OUTPUTS,
    DECODER,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER,
    ENCODER_INPUT,
    ENCODER_OUTPUTS,
    HEAD,
    HEAD_INPUTS,
    HEAD_OUTPUT,
    Tolerance,
)
from service.runtime import OnnxGraphs, output_differences
from service.scoring import ModelOutputs, batch_slices
from training.errors import ExportError
from training.model import VAE, CoarseGraph, FlatDecoder, FlatEncoder, ProbabilityHead

F32Array = npt.NDArray[np.float32]

# ORT (CPU) against PyTorch on the same inputs: both fp32, differing only in kernel order.
PARITY_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)
# Held-out images the parity check runs through both PyTorch and ONNX Runtime, at most.
PARITY_EXAMPLES = 64
# What a loaded bundle must reproduce on any device, CUDA included (TF32 convolutions there
# differ from fp32 by about 1e-3 relative); a changed model or graph misses it by far more.
GOLDEN_TOLERANCE = Tolerance(atol=2e-3, rtol=1e-2)
OPSET = 18


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
    examples: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> None:
    # The TorchScript exporter: these are static convolutional graphs that it traces exactly, in
    # well under a second, where the torch.export-based one takes 5-20 s per graph on a small
    # CPU. Either way the graph must pass the checker and the parity test below.
    torch.onnx.export(
        module,
        examples,
        str(path),
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_axes={name: {0: "batch"} for name in (*input_names, *output_names)},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def torch_outputs(model: VAE, images: F32Array, batch_size: int = 16) -> ModelOutputs:
    """What the exported graphs must give: the model's inference path in PyTorch, on CPU."""
    assert model.head is not None and model.coarse is not None, "a bundle needs every part"
    coarse = CoarseGraph(model.coarse, model.cfg.coarse_factor, images.shape[-2:])
    parts: list[ModelOutputs] = []
    with torch.no_grad():
        for rows in batch_slices(images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[rows]))
            mu, logvar = model.encoder(x)
            recon = model.decoder(mu)
            defect = ProbabilityHead(model.head)(x, recon)
            outputs = (mu.flatten(1), logvar.flatten(1), recon, defect, *coarse(x))
            parts.append(ModelOutputs(*(t.numpy() for t in outputs)))
    return ModelOutputs.joined(parts)


def export_model(
    model: VAE, out_dir: Path, examples: F32Array, *, threads: int | None = None
) -> tuple[OnnxGraphs, ParityReport]:
    """Write the four graphs into ``out_dir``, check them, and prove parity with PyTorch.

    ``examples`` are real preprocessed images ``(N, C, H, W)`` at the bundle's input size (at
    least two, so the batch axis is exercised); the graphs are fixed to that size. Parity is
    proved on the first ``PARITY_EXAMPLES`` of them, so that a large held-out set costs no more.
    """
    examples = examples[:PARITY_EXAMPLES]
    model = model.cpu().eval()
    if model.head is None:
        raise ExportError("the model has no defect head; a bundle needs one")
    if model.coarse is None:
        raise ExportError("the model has no coarse VAE; a bundle needs one")
    _, _, height, width = examples.shape
    grid = model.cfg.grid(height, width)
    paths = (out_dir / ENCODER, out_dir / DECODER, out_dir / HEAD, out_dir / COARSE)
    expected = torch_outputs(model, examples)
    x = torch.from_numpy(np.ascontiguousarray(examples[:2]))
    mu = torch.from_numpy(expected.mu[:2])
    recon = torch.from_numpy(expected.recon[:2])
    try:
        with _quiet_exporter():
            # Wrappers start in training mode, which the exporter restores onto the wrapped
            # modules after tracing; in eval mode they leave the model as it was.
            encoder = FlatEncoder(model.encoder).eval()
            _export_one(encoder, (x,), paths[0], [ENCODER_INPUT], ENCODER_OUTPUTS)
            decoder = FlatDecoder(model.decoder, model.cfg.latent_channels, grid).eval()
            _export_one(decoder, (mu,), paths[1], [DECODER_INPUT], [DECODER_OUTPUT])
            head = ProbabilityHead(model.head).eval()
            _export_one(head, (x, recon), paths[2], HEAD_INPUTS, [HEAD_OUTPUT])
            coarse = CoarseGraph(model.coarse, model.cfg.coarse_factor, (height, width)).eval()
            _export_one(coarse, (x,), paths[3], [COARSE_INPUT], COARSE_OUTPUTS)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    for path in paths:
        try:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        except Exception as exc:
            raise ExportError(f"the ONNX checker rejects {path}: {exc}") from exc
    graphs = OnnxGraphs(*paths, device="cpu", threads=threads)
    # Batches of several sizes: the dynamic axis must really be dynamic.
    actual = graphs.run_in_batches(examples, batch_size=max(1, examples.shape[0] // 2 + 1))
    try:
        diffs = output_differences(expected, actual, PARITY_TOLERANCE)
    except ValueError as exc:
        raise ExportError(
            f"ONNX Runtime differs from PyTorch on {examples.shape[0]} real inputs: {exc}; "
            "refusing to write the bundle"
        ) from exc
    return graphs, ParityReport(diffs, PARITY_TOLERANCE, examples.shape[0])
