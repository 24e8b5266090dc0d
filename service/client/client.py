"""A small synchronous client over the generated AnomalyDetector stub.

Images may be file paths (sent encoded), encoded bytes, or 8-bit numpy arrays ``(H, W)`` or
``(H, W, C)`` with C in 1, 3, 4 (sent raw). The client reaches one server or several replicas and
spreads its calls over them (round robin); gRPC retries a call that is refused UNAVAILABLE or
RESOURCE_EXHAUSTED, with backoff, within the call's one deadline (service/client/channel.py).
A stream cut by a replica that stops is resumed on another: the images it did not answer are
sent again. Failed calls raise ``grpc.RpcError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Union

import grpc
import numpy as np
import numpy.typing as npt

from service._proto import anomaly_pb2 as pb
from service._proto import anomaly_pb2_grpc as pb_grpc
from service.client.channel import channel_target, open_channel

ImageInput = Union[str, "os.PathLike[str]", bytes, npt.NDArray[np.uint8]]
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def to_image(image: ImageInput, image_id: str) -> pb.Image:
    """The wire form of one image: paths are read and sent encoded, arrays are sent raw."""
    if isinstance(image, bytes):
        return pb.Image(id=image_id, encoded=image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"image {image_id!r} is an array of {image.dtype} with shape {image.shape}; "
                "expected uint8 (H, W) or (H, W, C)"
            )
        height, width = image.shape[:2]
        channels = 1 if image.ndim == 2 else image.shape[2]
        raw = pb.RawImage(pixels=image.tobytes(), height=height, width=width, channels=channels)
        return pb.Image(id=image_id, raw=raw)
    return pb.Image(id=image_id, encoded=Path(image).read_bytes())


def default_id(image: ImageInput, index: int) -> str:
    """A path's own name for paths, the position in the input otherwise."""
    if isinstance(image, bytes | np.ndarray):
        return str(index)
    return str(image)


@dataclass(frozen=True)
class Result:
    """The outcome for one image: scores, or the error that kept it from being scored."""

    id: str
    model_id: str
    scores: pb.Scores | None
    error: pb.ImageError | None

    @classmethod
    def from_proto(cls, message: pb.ImageResult) -> Result:
        """Wrap an ImageResult message."""
        scored = message.WhichOneof("outcome") == "scores"
        return cls(
            id=message.id,
            model_id=message.model_id,
            scores=message.scores if scored else None,
            error=None if scored else message.error,
        )

    @property
    def ok(self) -> bool:
        """Whether the image was scored."""
        return self.scores is not None

    @property
    def is_anomaly(self) -> bool:
        """The verdict (False for an image that could not be scored)."""
        return self.scores is not None and self.scores.is_anomaly

    @property
    def error_code(self) -> grpc.StatusCode | None:
        """The status code of the image's error, if any."""
        if self.error is None:
            return None
        codes: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
        return codes.get(self.error.code, grpc.StatusCode.UNKNOWN)

    def anomaly_map(self) -> npt.NDArray[np.float32] | None:
        """The per-pixel anomaly map ``(H, W)``, when the request asked for it."""
        if self.scores is None or not self.scores.HasField("anomaly_map"):
            return None
        amap = self.scores.anomaly_map
        values = np.frombuffer(amap.values, dtype="<f4").astype(np.float32, copy=False)
        return values.reshape(amap.height, amap.width)

    def latent_mean(self) -> npt.NDArray[np.float32] | None:
        """The latent posterior mean ``(D,)`` (channel-major over the latent grid), when the
        request asked for it."""
        if self.scores is None or not self.scores.latent_mean:
            return None
        return np.asarray(self.scores.latent_mean, dtype=np.float32)


def score_options(
    threshold: float | None,
    target_false_alarm_rate: float | None,
    return_anomaly_map: bool,
    return_latent_mean: bool,
) -> pb.ScoreOptions:
    """ScoreOptions from keyword arguments (the server checks their ranges)."""
    if threshold is not None and target_false_alarm_rate is not None:
        raise ValueError("give a threshold or a target false-alarm rate, not both")
    options = pb.ScoreOptions(
        return_anomaly_map=return_anomaly_map, return_latent_mean=return_latent_mean
    )
    if threshold is not None:
        options.threshold = threshold
    elif target_false_alarm_rate is not None:
        options.target_false_alarm_rate = target_false_alarm_rate
    return options


class _StreamFeed:
    """The request messages of one logical stream across its attempts (gRPC streams): what was
    sent and not answered is sent again, first, on the next attempt. Thread-safe: gRPC pulls each
    attempt's messages in a thread of its own."""

    def __init__(self, source: Iterator[pb.ScoreStreamRequest]) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._unanswered: deque[pb.ScoreStreamRequest] = deque()
        self._attempt = 0

    def attempt(self) -> Iterator[pb.ScoreStreamRequest]:
        """The messages of a new attempt; the previous attempt's iterator stops."""
        with self._lock:
            self._attempt += 1
            number = self._attempt
            resend = list(self._unanswered)
        for again in resend:
            if number != self._attempt:
                return
            yield again
        while True:
            with self._lock:
                if number != self._attempt:
                    return
                message = next(self._source, None)
                if message is None:
                    return
                self._unanswered.append(message)
            yield message

    def answered(self) -> None:
        """The oldest message sent has been answered (replies come in order)."""
        with self._lock:
            self._unanswered.popleft()


class Client:
    """Connection to an anomaly-detection service; use as a context manager, or call close().

    ``target`` is one address (``host:port``, or ``dns:///name:port`` for every replica a name
    resolves to) or several IP addresses (a sequence, or comma-separated). ``timeout`` is the
    deadline of each unary call, its retries included; ``retries`` (0 to 4) how many times gRPC
    may retry it, after ``backoff`` seconds at most, doubling up to ``max_backoff``.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        credentials = None
        if tls or root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        self._channel = open_channel(
            channel_target(target),
            credentials=credentials,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_message_bytes=max_message_bytes,
        )
        self._stub = pb_grpc.AnomalyDetectorStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def score(
        self,
        images: Sequence[ImageInput],
        *,
        ids: Sequence[str] | None = None,
        threshold: float | None = None,
        target_false_alarm_rate: float | None = None,
        return_anomaly_map: bool = False,
        return_latent_mean: bool = False,
        timeout: float | None = None,
    ) -> list[Result]:
        """Score images in one ScoreBatch call; results in input order."""
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        request = pb.ScoreBatchRequest(
            images=[
                to_image(image, ids[i] if ids is not None else default_id(image, i))
                for i, image in enumerate(images)
            ],
            options=score_options(
                threshold, target_false_alarm_rate, return_anomaly_map, return_latent_mean
            ),
        )
        response: pb.ScoreBatchResponse = self._stub.ScoreBatch(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        return [Result.from_proto(result) for result in response.results]

    def score_stream(
        self,
        images: Iterable[ImageInput | tuple[str, ImageInput]],
        *,
        threshold: float | None = None,
        target_false_alarm_rate: float | None = None,
        return_anomaly_map: bool = False,
        return_latent_mean: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Result]:
        """Score images over a ScoreStream call, yielding results in input order.

        Items are images or ``(id, image)`` pairs; the input is read lazily as the stream sends.
        ``timeout`` bounds the whole stream (default: none). When the stream ends UNAVAILABLE
        after answering some images (its replica shut down), the rest are sent again on a new
        stream (to another replica where there is one), so that every image gets one result; a
        new stream that gets no answer at all (gRPC has retried it already) raises.
        """
        options = score_options(
            threshold, target_false_alarm_rate, return_anomaly_map, return_latent_mean
        )

        def requests() -> Iterator[pb.ScoreStreamRequest]:
            for index, item in enumerate(images):
                image_id, image = item if isinstance(item, tuple) else (None, item)
                image_id = image_id if image_id is not None else default_id(image, index)
                yield pb.ScoreStreamRequest(image=to_image(image, image_id), options=options)

        feed = _StreamFeed(requests())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            responses = self._stub.ScoreStream(
                feed.attempt(), timeout=left, metadata=self._metadata
            )
            answered = 0
            try:
                for response in responses:
                    feed.answered()
                    answered += 1
                    yield Result.from_proto(response.result)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or answered == 0:
                    raise
            finally:
                responses.cancel()

    def info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        """The model being served, its device and the server's limits."""
        info: pb.ModelInfo = self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return info

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
