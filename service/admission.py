"""Admission control: how many images the server holds for its calls, in all and per client.

Every image a call brings is admitted before it is decoded and held until its reply is handed to
gRPC: while it is decoded, waits in the micro-batcher's queue, is scored, and (streams) while its
reply waits to be sent to a client that does not read. A call is admitted whole or refused with
:class:`QueueFullError` (RESOURCE_EXHAUSTED): when the server holds ``capacity`` images in all, or
when the call's client (one gRPC connection: a client's channel multiplexes all its calls on one)
holds ``per_client`` of them. A slow or hostile client thus fills its own share and never takes the
memory or the queue of the others. Runs on the server's event loop; not thread-safe.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType

from service.metrics import ServiceMetrics


class QueueFullError(Exception):
    """No room for the images of a call, in the queue or in its client's share; retry later."""


class AdmissionControl:
    """Counts the images held for calls, in all and per client; see the module doc."""

    def __init__(self, metrics: ServiceMetrics, *, capacity: int, per_client: int) -> None:
        if not 1 <= per_client <= capacity:
            raise ValueError(
                f"admission needs 1 <= per_client <= capacity; got {per_client} and {capacity}"
            )
        self.capacity = capacity
        self.per_client = per_client
        self._metrics = metrics
        self._held = 0
        self._by_client: Counter[str] = Counter()
        metrics.queue_capacity.set(capacity)
        metrics.queue_depth.set(0)

    @property
    def held(self) -> int:
        """Images held for calls now."""
        return self._held

    def held_by(self, client: str) -> int:
        """Images held for the calls of ``client`` now."""
        return self._by_client[client]

    def admit(self, client: str, count: int) -> Ticket:
        """Hold room for ``count`` images of ``client``, all or none; raises QueueFullError."""
        if count < 1:
            raise ValueError(f"cannot admit {count} images")
        if self._held + count > self.capacity:
            raise QueueFullError(
                f"the scoring queue is full: {self._held} of {self.capacity} images waiting, "
                f"no room for {count} more; retry later with backoff"
            )
        mine = self._by_client[client]
        if mine + count > self.per_client:
            raise QueueFullError(
                f"this client already has {mine} images waiting, of the {self.per_client} one "
                f"client may have (of {self.capacity} in all): no room for {count} more; read "
                "the replies of your streams, or retry later with backoff"
            )
        self._change(client, count)
        return Ticket(self, client, count)

    def _change(self, client: str, count: int) -> None:
        self._held += count
        self._by_client[client] += count
        if not self._by_client[client]:
            del self._by_client[client]
        self._metrics.queue_depth.set(self._held)


class Ticket:
    """Room held for some images of one client; given back by :meth:`release` or on exit."""

    def __init__(self, control: AdmissionControl, client: str, count: int) -> None:
        self._control = control
        self._client = client
        self.count = count

    def release(self, count: int | None = None) -> None:
        """Give back ``count`` images of the room (default: all that is left)."""
        count = self.count if count is None else min(count, self.count)
        if count > 0:
            self.count -= count
            self._control._change(self._client, -count)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
