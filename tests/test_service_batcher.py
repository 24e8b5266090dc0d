"""The micro-batcher (service/batcher.py) with a fake scoring function: no model needed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.batcher import (
    BatcherClosedError,
    DeadlineExpiredError,
    FloatArray,
    MicroBatcher,
)
from service.metrics import ServiceMetrics

Output = tuple[str, list[int]]  # (model, the value of each image of the batch)
Part = tuple[str, list[int]]  # (model, the value of each image of a job's part)


@dataclass
class FakeModel:
    """Records the batches it scores; can be held at a gate to keep the device busy."""

    name: str
    batches: list[list[int]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    fail: bool = False
    poison: int | None = None  # a batch holding an image of this value fails

    def __post_init__(self) -> None:
        self.gate.set()


def run_batch(model: FakeModel, x: FloatArray) -> Output:
    model.gate.wait(10)
    firsts = [int(v) for v in x[:, 0, 0, 0].tolist()]
    if model.fail:
        raise RuntimeError("the device fell over")
    if model.poison in firsts:
        raise ValueError(f"image {model.poison} is poison")
    model.batches.append(firsts)
    return model.name, firsts


def images(*values: float) -> FloatArray:
    """A batch (k, 1, 2, 2) whose images are filled with the given values."""
    return np.array(values, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones(
        (1, 1, 2, 2), np.float32
    )


def run(
    test: Callable[[MicroBatcher[FakeModel, Output], ServiceMetrics], Awaitable[None]],
    *,
    max_delay: float = 0.05,
    coalesce: bool = True,
) -> ServiceMetrics:
    """Run ``test`` against a started batcher (batches of 4)."""
    metrics = ServiceMetrics(CollectorRegistry())

    async def main() -> None:
        batcher: MicroBatcher[FakeModel, Output] = MicroBatcher(
            run_batch,
            metrics,
            max_batch_size=4,
            max_delay=max_delay,
            coalesce=coalesce,
        )
        batcher.start()
        try:
            await test(batcher, metrics)
        finally:
            await batcher.close()

    asyncio.run(main())
    return metrics


async def submit(
    batcher: MicroBatcher[FakeModel, Output],
    model: FakeModel,
    x: FloatArray,
    deadline: float | None = None,
) -> list[Part]:
    parts = await batcher.submit(model, x, deadline=deadline)
    return [(part.output[0], part.output[1][part.start : part.stop]) for part in parts]


def value(metrics: ServiceMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def test_concurrent_calls_share_batches_and_get_their_own_results() -> None:
    model = FakeModel("m")

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        results = list(
            await asyncio.gather(
                submit(batcher, model, images(1, 2)),
                submit(batcher, model, images(3)),
                submit(batcher, model, images(4)),
            )
        )
        assert results == [[("m", [1, 2])], [("m", [3])], [("m", [4])]]
        assert model.batches == [[1, 2, 3, 4]]  # one batch, in arrival order
        assert value(metrics, "anomaly_batch_size_images_count") == 1
        assert value(metrics, "anomaly_batch_size_images_sum") == 4
        assert batcher.depth == 0

    run(test, max_delay=5.0)  # a full batch does not wait for the delay


def test_a_call_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    model = FakeModel("m")

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        parts = await submit(batcher, model, images(1, 2, 3, 4, 5, 6, 7))
        assert parts == [("m", [1, 2, 3, 4]), ("m", [5, 6, 7])]
        assert model.batches == [[1, 2, 3, 4], [5, 6, 7]]

    run(test)


def test_the_depth_counts_images_waiting_for_a_batch() -> None:
    model = FakeModel("m")
    model.gate.clear()  # the device is busy: nothing leaves the queue

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        first = asyncio.create_task(submit(batcher, model, images(1, 2, 3, 4)))
        await asyncio.sleep(0.1)  # taken into the (blocked) batch: the queue is empty again
        assert batcher.depth == 0
        queued = asyncio.create_task(submit(batcher, model, images(5, 6, 7, 8, 9, 10)))
        await asyncio.sleep(0)
        assert batcher.depth == 6
        model.gate.set()
        assert await first == [("m", [1, 2, 3, 4])]
        assert await queued == [("m", [5, 6, 7, 8]), ("m", [9, 10])]
        assert batcher.depth == 0

    run(test)


def test_cancelled_and_expired_calls_are_not_computed() -> None:
    model = FakeModel("m")
    model.gate.clear()

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        loop = asyncio.get_running_loop()
        busy = asyncio.create_task(submit(batcher, model, images(1, 2, 3, 4)))
        await asyncio.sleep(0.1)
        cancelled = asyncio.create_task(submit(batcher, model, images(5)))
        expired = asyncio.create_task(submit(batcher, model, images(6), deadline=loop.time()))
        kept = asyncio.create_task(submit(batcher, model, images(7)))
        await asyncio.sleep(0)
        cancelled.cancel()
        model.gate.set()
        await busy
        assert await kept == [("m", [7])]
        with pytest.raises(DeadlineExpiredError, match="deadline passed"):
            await expired
        assert cancelled.cancelled()
        assert model.batches == [[1, 2, 3, 4], [7]]
        assert batcher.depth == 0

    run(test)


def test_a_batch_never_mixes_models() -> None:
    old, new = FakeModel("old"), FakeModel("new")

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        results = list(
            await asyncio.gather(
                submit(batcher, old, images(1)),
                submit(batcher, new, images(2)),
                submit(batcher, new, images(3)),
            )
        )
        assert results == [[("old", [1])], [("new", [2])], [("new", [3])]]
        assert old.batches == [[1]] and new.batches == [[2, 3]]

    run(test)


def test_without_batching_each_call_runs_alone() -> None:
    model = FakeModel("m")

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        assert batcher.max_delay == 0.0
        await asyncio.gather(*(submit(batcher, model, images(v, v)) for v in (1, 2, 3)))
        assert sorted(model.batches) == [[1, 1], [2, 2], [3, 3]]

    run(test, coalesce=False, max_delay=5.0)


def test_a_failing_image_fails_only_its_own_job_of_a_shared_batch() -> None:
    model = FakeModel("m", poison=3)

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        outcomes = await asyncio.gather(
            submit(batcher, model, images(1)),
            submit(batcher, model, images(2, 3)),
            submit(batcher, model, images(4)),
            return_exceptions=True,
        )
        assert outcomes[0] == [("m", [1])] and outcomes[2] == [("m", [4])]
        assert isinstance(outcomes[1], ValueError) and "poison" in str(outcomes[1])
        # The shared batch failed; each job ran again alone, and only the poisoned one failed.
        assert model.batches == [[1], [4]]
        assert batcher.depth == 0

    run(test, max_delay=5.0)


def test_an_inference_error_fails_only_its_batch() -> None:
    bad, good = FakeModel("bad", fail=True), FakeModel("good")

    async def test(batcher: MicroBatcher[FakeModel, Output], metrics: ServiceMetrics) -> None:
        with pytest.raises(RuntimeError, match="fell over"):
            await submit(batcher, bad, images(1))
        assert await submit(batcher, good, images(2)) == [("good", [2])]

    run(test)


def test_closing_fails_waiting_calls_and_refuses_new_ones() -> None:
    model = FakeModel("m")

    async def main() -> None:
        metrics = ServiceMetrics(CollectorRegistry())
        batcher: MicroBatcher[FakeModel, Output] = MicroBatcher(
            run_batch, metrics, max_batch_size=4, max_delay=10.0
        )
        batcher.start()
        waiting = asyncio.create_task(submit(batcher, model, images(1)))
        await asyncio.sleep(0.05)
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await waiting
        with pytest.raises(BatcherClosedError):
            await submit(batcher, model, images(2))
        assert model.batches == []

    asyncio.run(main())
