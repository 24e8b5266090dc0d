"""Part 1: the in-process limits, with no network.

(i)  ``Scorer.score`` (encoder, decoder and scoring) on pre-decoded batches;
(ii) the same starting from the encoded bytes: decode, preprocess into the batch, then score.

Both run in this thread with the same ONNX Runtime session, so their ratio is what decoding and
preprocessing cost. The two are measured side by side, alternating short slices, so that load
from other processes on a shared machine falls on both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from bench.images import ImageSet
from service.preprocessing import decode_image, preprocess, preprocess_into
from service.runtime import Scorer

SLICE_SECONDS = 0.5
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class InProcessRow:
    """Throughput at one batch size, in images per second."""

    batch_size: int
    tensor_ips: float  # (i): pre-decoded tensors
    png_ips: float  # (ii): from encoded bytes

    @property
    def batch_seconds(self) -> float:
        """Time of one batch of pre-decoded tensors (encoder, decoder, scoring)."""
        return self.batch_size / self.tensor_ips

    @property
    def decode_ms_per_image(self) -> float:
        """What decoding and preprocessing add per image, in milliseconds."""
        return 1000.0 * (1.0 / self.png_ips - 1.0 / self.tensor_ips)


def _score(scorer: Scorer, batch: FloatArray) -> None:
    scorer.score(batch)


class _FromBytes:
    """One step of (ii): decode and preprocess the next images into ``out``, then score it."""

    def __init__(self, scorer: Scorer, encoded: Sequence[bytes], out: FloatArray) -> None:
        self.scorer = scorer
        self.encoded = encoded
        self.out = out
        self.next = 0

    def __call__(self) -> None:
        spec = self.scorer.manifest.input
        count = len(self.encoded)
        for row in range(self.out.shape[0]):
            preprocess_into(decode_image(self.encoded[self.next]), spec, self.out[row])
            self.next = (self.next + 1) % count
        self.scorer.score(self.out)


class _Meter:
    """Accumulates images and seconds of repeated calls of one function."""

    def __init__(self, step: Callable[[], None], images_per_step: int) -> None:
        self.step = step
        self.images_per_step = images_per_step
        self.images = 0
        self.seconds = 0.0

    def run_for(self, seconds: float) -> None:
        started = time.perf_counter()
        end = started + seconds
        steps = 0
        while True:
            self.step()
            steps += 1
            now = time.perf_counter()
            if now >= end and steps >= 2:
                break
        self.images += steps * self.images_per_step
        self.seconds += now - started

    @property
    def rate(self) -> float:
        return self.images / self.seconds


class InProcessBench:
    """Meters of (i) and (ii) at each batch size; :meth:`run` adds time to all of them."""

    def __init__(self, scorer: Scorer, images: ImageSet, batch_sizes: Sequence[int]) -> None:
        spec = scorer.manifest.input
        decoded = [preprocess(decode_image(data), spec) for data in images.encoded]
        self._meters: list[tuple[int, _Meter, _Meter]] = []
        for batch_size in batch_sizes:
            picks = [i % len(images) for i in range(batch_size)]
            tensor_batch = np.ascontiguousarray(np.stack([decoded[i] for i in picks]))
            png_batch = np.empty((batch_size, *spec.shape), dtype=np.float32)
            tensor_meter = _Meter(partial(_score, scorer, tensor_batch), batch_size)
            png_meter = _Meter(_FromBytes(scorer, images.encoded, png_batch), batch_size)
            self._meters.append((batch_size, tensor_meter, png_meter))
        self._warm = False

    def run(self, seconds: float) -> None:
        """Measure every figure for about ``seconds`` more, (i) and (ii) alternating."""
        for _, tensor_meter, png_meter in self._meters:
            if not self._warm:  # the first runs of a batch size allocate ORT's arenas
                for meter in (tensor_meter, png_meter):
                    meter.run_for(0.2)
                    meter.images = 0
                    meter.seconds = 0.0
            tensor_goal = tensor_meter.seconds + seconds
            png_goal = png_meter.seconds + seconds
            while tensor_meter.seconds < tensor_goal or png_meter.seconds < png_goal:
                tensor_meter.run_for(SLICE_SECONDS)
                png_meter.run_for(SLICE_SECONDS)
        self._warm = True

    def rows(self) -> list[InProcessRow]:
        """The figures so far, one row per batch size."""
        return [
            InProcessRow(batch_size, tensor_meter.rate, png_meter.rate)
            for batch_size, tensor_meter, png_meter in self._meters
        ]
