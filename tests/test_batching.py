"""The dynamic batcher (service/batching.py): merging, max delay, preferred sizes, queue bound, queue
timeout, splitting of large requests, cancellation, no state that outlives the load.

The model is a numpy function (doubles its input and records each call's batch size) so every test can
hold the batcher's thread at a known point with a gate: assertions never depend on timing, except the
lower bound a fixed delay must wait."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import BatchingConfig, DynamicBatcher
from service.errors import Unavailable

GUARD_S = 60  # turns a hang into a failure; not a timing assertion


class Model:
    """``y = 2x``; the first call can block on ``gate`` so requests pile up behind it."""

    def __init__(self, block_first: bool = False) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.block_first = block_first

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        if self.block_first and not self.sizes:
            self.gate.wait(GUARD_S)
        self.sizes.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}


def batcher_for(model: Model, **config) -> DynamicBatcher:
    return DynamicBatcher("m", model, lambda name: 0, BatchingConfig(**config))


def x(n: int, width: int = 3, start: float = 0) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD_S))


async def behind_a_blocker(batcher: DynamicBatcher, model: Model, requests: list[dict]) -> list:
    """Start a 1-item request that blocks the model, queue ``requests`` behind it, then release it."""
    blocker = asyncio.ensure_future(batcher.infer(x(1)))
    await asyncio.to_thread(model.entered.wait, GUARD_S)
    tasks = [asyncio.ensure_future(batcher.infer(r)) for r in requests]
    await asyncio.sleep(0)  # every request is enqueued
    model.gate.set()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_queued_requests_merge_into_one_call_and_each_gets_its_rows():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=8)
    requests = [x(1, start=0), x(2, start=10), x(3, start=20)]
    results = run(behind_a_blocker(batcher, model, requests))
    assert model.sizes == [1, 6]
    for request, (outputs, stats) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(outputs["y"], request["x"] * 2)
        assert stats.batch_size == 6
    batcher.close()


def test_a_batch_never_exceeds_max_batch_size_and_order_is_fifo():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=4)
    results = run(behind_a_blocker(batcher, model, [x(3), x(2), x(1), x(2)]))
    assert model.sizes == [1, 3, 3, 2]  # [3] (2 would not fit), [2, 1], [2]
    assert all(not isinstance(r, BaseException) for r in results)
    batcher.close()


def test_max_queue_delay_waits_for_company_and_a_full_batch_goes_at_once():
    model = Model()
    batcher = batcher_for(model, max_batch_size=4, max_queue_delay_s=0.05)

    async def main():
        alone = await batcher.infer(x(1))
        full = await asyncio.gather(*(batcher.infer(x(1)) for _ in range(4)))
        return alone, full

    (outputs, stats), full = run(main())
    assert stats.batch_size == 1 and stats.queue_s >= 0.05  # waited out the delay for nobody
    assert model.sizes[1:] == [4] and all(s.batch_size == 4 for _, s in full)
    batcher.close()


def test_a_preferred_batch_size_runs_without_waiting_out_the_delay():
    model = Model()
    batcher = batcher_for(model, max_batch_size=8, max_queue_delay_s=GUARD_S * 2, preferred_batch_sizes=(2,))

    async def main():
        return await asyncio.gather(batcher.infer(x(1)), batcher.infer(x(1)))

    results = run(main())  # with the delay alone this would hang past the guard
    assert model.sizes == [2] and [s.batch_size for _, s in results] == [2, 2]
    batcher.close()


def test_a_full_queue_rejects_at_once_with_retry_after():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=1, max_queue_size=2, queue_timeout_s=3)
    results = run(behind_a_blocker(batcher, model, [x(1), x(1), x(1)]))
    assert [isinstance(r, Unavailable) for r in results] == [False, False, True]
    rejected = results[2]
    assert rejected.status == 503 and rejected.retry_after == 3 and "NNSERVE_MAX_QUEUE_SIZE" in str(rejected)
    batcher.close()


def test_a_request_waiting_past_its_queue_timeout_is_rejected():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=4, queue_timeout_s=0.01)

    async def main():
        blocker = asyncio.ensure_future(batcher.infer(x(1)))
        await asyncio.to_thread(model.entered.wait, GUARD_S)
        waiting = asyncio.ensure_future(batcher.infer(x(1)))
        await asyncio.sleep(0.05)  # past its timeout while the model is busy
        model.gate.set()
        await blocker
        return await asyncio.gather(waiting, return_exceptions=True)

    [result] = run(main())
    assert isinstance(result, Unavailable) and "NNSERVE_QUEUE_TIMEOUT_MS" in str(result)
    assert model.sizes == [1]  # the timed-out request never ran
    batcher.close()


def test_a_request_larger_than_max_batch_size_is_split_and_reassembled():
    model = Model()
    batcher = batcher_for(model, max_batch_size=4, max_queue_size=1)
    request = x(10)
    outputs, stats = run(batcher.infer(request))
    np.testing.assert_array_equal(outputs["y"], request["x"] * 2)
    assert sorted(model.sizes) == [2, 4, 4] and stats.batch_size == 4
    # ... and a single request right after runs alone at once: nothing learned from the big one.
    outputs, stats = run(batcher.infer(x(1)))
    assert stats.batch_size == 1 and model.sizes[-1] == 1
    batcher.close()


def test_requests_of_other_shapes_do_not_merge():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=8)
    results = run(behind_a_blocker(batcher, model, [x(1, width=3), x(1, width=5), x(1, width=3)]))
    assert model.sizes == [1, 2, 1]
    assert [r[0]["y"].shape for r in results] == [(1, 3), (1, 5), (1, 3)]
    batcher.close()


def test_a_cancelled_request_frees_its_place_at_once():
    model = Model(block_first=True)
    batcher = batcher_for(model, max_batch_size=1, max_queue_size=1)

    async def main():
        blocker = asyncio.ensure_future(batcher.infer(x(1)))
        await asyncio.to_thread(model.entered.wait, GUARD_S)
        waiting = asyncio.ensure_future(batcher.infer(x(1)))
        await asyncio.sleep(0)
        assert batcher.queued == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.queued == 0
        replacement = asyncio.ensure_future(batcher.infer(x(1)))  # the queue has room again
        await asyncio.sleep(0)
        model.gate.set()
        await blocker
        return await replacement

    outputs, stats = run(main())
    assert model.sizes == [1, 1] and stats.batch_size == 1
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_serving():
    calls = []

    def flaky(feeds):
        calls.append(len(feeds["x"]))
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return {"y": feeds["x"] * 2}

    batcher = DynamicBatcher("m", flaky, lambda name: 0, BatchingConfig())
    with pytest.raises(RuntimeError, match="model exploded"):
        run(batcher.infer(x(1)))
    outputs, _ = run(batcher.infer(x(2)))
    np.testing.assert_array_equal(outputs["y"], x(2)["x"] * 2)
    batcher.close()
    with pytest.raises(Unavailable, match="shutting down"):
        run(batcher.infer(x(1)))
