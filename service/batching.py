"""Dynamic batching of whole requests, with the semantics of Triton's ``dynamic_batching`` and queue policy.

One batcher per model and worker process; one dedicated thread per model instance (Triton's
``instance_group`` count: one ONNX Runtime session each) takes the next due batch off the one queue and
runs it, so N instances run up to N batches at once (no thread hop per request: the event loop only
enqueues and is woken once per batch with every result in it). Adaptive (``lone``): a batch that is the
only work of the batcher (no other instance busy, nothing left queued) runs on the lone-request session
instead, which has more threads: all cores for a lone request, one per session under load.

- ``max_batch_size``: items per model call. A request with more items is split into chunks of at most
  that size, queued one after another (two in flight, so the model never idles between them) and
  reassembled: a request of any size runs; it is never told to retry for something that cannot fit
  (only its first chunk is subject to the queue bound).
- ``max_queue_delay``: how long the oldest request may wait for others to join. A fixed, configured
  wait: nothing is learned from past batches, so no state outlives the load. 0 (the default, as in
  Triton) runs whatever is queued as soon as the model is free: batches then grow with the load alone.
- ``preferred_batch_sizes``: a batch of one of these sizes (the largest that can be formed) runs at
  once, without waiting out the delay.
- ``max_queue_size``: requests (or chunks) waiting; one more is rejected at once (``Unavailable``: 503
  with Retry-After). ``queue_timeout``: a request still waiting after it is rejected the same way.
- Requests merge only with requests of the same item shape and dtype (``batch_key``); FIFO otherwise.
- A caller that goes away (its task cancelled) leaves the queue at once and frees its place.

Hand-written: BentoML's batcher learns its wait from past batches (it stayed at ~360 ms after one huge
request) and no Python library offers Triton's queue policy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import Unavailable

log = logging.getLogger("nnserve.batching")

Feeds = dict[str, np.ndarray]
CHUNKS_IN_FLIGHT = 2


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 128
    queue_timeout_s: float = 0.0  # 0 = wait as long as it takes

    @property
    def retry_after_s(self) -> int:
        """Retry-After for a rejected request: whole seconds (HTTP), at least 1."""
        return max(1, math.ceil(self.queue_timeout_s))


@dataclass
class BatchStats:
    """What one request's (last) batch was: for the response's timings and the metrics."""

    queue_s: float = 0.0  # from enqueue until its batch started
    inference_s: float = 0.0  # the model call that ran it
    batch_size: int = 0  # items in that call


@dataclass(eq=False)
class _Entry:
    feeds: Feeds
    items: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float  # monotonic; inf = no timeout
    stats: BatchStats = field(default_factory=BatchStats)


class DynamicBatcher:
    """``outputs, stats = await batcher.infer(feeds)``. ``run`` is the model call (a dict of arrays in,
    a dict of arrays out), or one per instance; ``batch_axis(name)`` the batch axis of each input and output
    tensor, ``on_batch(items, seconds, still_queued)`` is called after each model call (metrics)."""

    def __init__(self, name: str, run: Callable[[Feeds], Feeds] | Sequence[Callable[[Feeds], Feeds]],
                 batch_axis: Callable[[str], int], config: BatchingConfig,
                 on_batch: Callable[[int, float, int], None] | None = None,
                 lone: Callable[[Feeds], Feeds] | None = None) -> None:
        runs = list(run) if isinstance(run, Sequence) else [run]
        self._lone = lone
        self._busy = 0  # instances running a batch (under _lock)
        if not runs:
            raise ValueError("a batcher needs at least one model instance")
        self.name, self._batch_axis, self.config, self._on_batch = name, batch_axis, config, on_batch
        self._axes: dict[str, int] = {}  # tensor name -> batch axis, asked once (the hot path asks per request)
        self._queue: collections.deque[_Entry] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(r,), name=f"batcher-{name}-{i}", daemon=True)
                         for i, r in enumerate(runs)]
        for thread in self._threads:
            thread.start()

    @property
    def instances(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Requests (or chunks of a split request) waiting for a batch."""
        return len(self._queue)

    async def infer(self, feeds: Feeds) -> tuple[Feeds, BatchStats]:
        """Run ``feeds`` (any number of items >= 1 along the batch axes) and return the outputs for exactly
        those items. Raises ``Unavailable`` when the queue is full or the request waited past its timeout."""
        items = self._items(feeds)
        size = self.config.max_batch_size
        if items <= size:
            return await self._submit(feeds, items)
        # Split along the batch axis; at most CHUNKS_IN_FLIGHT queued at a time, so one huge request cannot
        # fill the queue and small requests keep interleaving with its chunks.
        starts = range(0, items, size)
        chunks = [{k: self._slice(k, v, s, s + size) for k, v in feeds.items()} for s in starts]
        semaphore = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def run_chunk(chunk: Feeds, admitted: bool) -> tuple[Feeds, BatchStats]:
            async with semaphore:
                return await self._submit(chunk, self._items(chunk), admitted)

        # The first chunk is admitted like any request; the rest of an admitted request are not turned away.
        tasks = [asyncio.ensure_future(run_chunk(c, i > 0)) for i, c in enumerate(chunks)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one chunk failed or the caller went away: drop the rest too
            for task in tasks:
                task.cancel()
            raise
        outputs = {k: np.concatenate([r[0][k] for r in results], axis=self._axis(k)) for k in results[0][0]}
        stats = BatchStats(queue_s=sum(r[1].queue_s for r in results),
                           inference_s=sum(r[1].inference_s for r in results),
                           batch_size=max(r[1].batch_size for r in results))
        return outputs, stats

    def close(self) -> None:
        """Stop the thread; requests still queued get ``Unavailable``."""
        with self._lock:
            self._closed = True
            rejected = list(self._queue)
            self._queue.clear()
            self._lock.notify_all()
        self._reject(rejected, "the server is shutting down")
        for thread in self._threads:
            thread.join(timeout=10)

    # -- event-loop side ------------------------------------------------------------------------------

    def _axis(self, name: str) -> int:
        axis = self._axes.get(name)
        if axis is None:
            axis = self._axes[name] = self._batch_axis(name)
        return axis

    def _items(self, feeds: Feeds) -> int:
        name, array = next(iter(feeds.items()))
        return array.shape[self._axis(name)]

    def _slice(self, name: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[self._axis(name)] = slice(start, stop)
        return array[tuple(index)]

    def _key(self, feeds: Feeds) -> tuple:
        """Requests merge only if every tensor has the same dtype and the same shape off the batch axis."""
        return tuple((k, v.dtype.str, v.shape[:self._axis(k)] + v.shape[self._axis(k) + 1:])
                     for k, v in sorted(feeds.items()))

    async def _submit(self, feeds: Feeds, items: int, admitted: bool = False) -> tuple[Feeds, BatchStats]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        timeout = self.config.queue_timeout_s
        entry = _Entry(feeds, items, self._key(feeds), loop.create_future(), loop, now,
                       now + timeout if timeout > 0 else math.inf)
        with self._lock:
            if self._closed:
                raise Unavailable(f"model {self.name!r} is shutting down")
            if len(self._queue) >= self.config.max_queue_size and not admitted:
                raise Unavailable(f"model {self.name!r} is overloaded: {len(self._queue)} requests are queued "
                                  f"(NNSERVE_MAX_QUEUE_SIZE={self.config.max_queue_size}); retry later",
                                  self.config.retry_after_s)
            self._queue.append(entry)
            self._lock.notify()
        try:
            return await entry.future
        except asyncio.CancelledError:  # the caller went away: free its place in the queue now
            with self._lock:
                if entry in self._queue:
                    self._queue.remove(entry)
            raise

    # -- worker thread ----------------------------------------------------------------------------------

    def _worker(self, run: Callable[[Feeds], Feeds]) -> None:
        """One instance: runs the next due batch, while the other instances' threads take the ones after it."""
        while True:
            with self._lock:
                batch, expired = self._next_batch()
                if batch is None:
                    return
                if self._queue:  # more is waiting: an idle instance may take it now
                    self._lock.notify()
                alone = self._lone is not None and self._busy == 0 and not self._queue
                self._busy += bool(batch)
            self._reject(expired, None)
            if batch:
                try:
                    self._execute(batch, self._lone if alone and self._lone is not None else run)
                finally:
                    with self._lock:
                        self._busy -= 1

    def _next_batch(self) -> tuple[list[_Entry] | None, list[_Entry]]:
        """Wait (holding the lock) until a batch is due, then take it off the queue. Returns (None, []) once
        closed, else (batch, requests whose queue timeout passed)."""
        config = self.config
        while not self._queue:
            if self._closed:
                return None, []
            self._lock.wait()
        while True:
            now = time.monotonic()
            expired = [e for e in self._queue if e.deadline <= now]
            for e in expired:
                self._queue.remove(e)
            if not self._queue:
                return [], expired
            head = self._queue[0]
            compatible = [e for e in self._queue if e.key == head.key]
            available = sum(e.items for e in compatible)
            waited_out = now >= head.enqueued + config.max_queue_delay_s
            target = None
            if available >= config.max_batch_size or waited_out or self._closed:
                target = config.max_batch_size
            else:
                fitting = [p for p in config.preferred_batch_sizes if p <= available]
                if fitting:
                    target = max(fitting)
            if target is not None:
                batch, total = list[_Entry](), 0
                for e in compatible:
                    if total + e.items > target and batch:
                        break
                    batch.append(e)
                    total += e.items
                for e in batch:
                    self._queue.remove(e)
                return batch, expired
            if expired:
                return [], expired
            wake = min(head.enqueued + config.max_queue_delay_s, min(e.deadline for e in self._queue))
            self._lock.wait(timeout=max(0.0, wake - now))

    def _execute(self, batch: list[_Entry], run: Callable[[Feeds], Feeds]) -> None:
        start = time.monotonic()
        items = sum(e.items for e in batch)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {k: np.concatenate([e.feeds[k] for e in batch], axis=self._axis(k)) for k in batch[0].feeds}
            outputs = run(feeds)
            seconds = time.monotonic() - start
            results: list = []
            offset = 0
            for e in batch:
                results.append({k: self._slice(k, v, offset, offset + e.items) for k, v in outputs.items()})
                offset += e.items
                e.stats = BatchStats(start - e.enqueued, seconds, items)
        except Exception as error:  # fail this batch's requests, keep serving
            log.exception("batch of %d items for %s failed", items, self.name)
            seconds, results = time.monotonic() - start, [error] * len(batch)
        if self._on_batch is not None:
            try:
                self._on_batch(items, seconds, len(self._queue))
            except Exception:  # a metrics bug must not stop inference
                log.exception("on_batch callback failed")
        self._deliver(batch, results)

    @staticmethod
    def _deliver(batch: list[_Entry], results: list) -> None:
        """Wake each event loop once for the whole batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for e, result in zip(batch, results, strict=True):
            by_loop.setdefault(e.loop, []).append((e, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _reject(self, entries: list[_Entry], reason: str | None) -> None:
        if not entries:
            return
        config = self.config
        message = reason or (f"model {self.name!r} is overloaded: the request waited over "
                             f"{config.queue_timeout_s * 1e3:.0f} ms in the queue (NNSERVE_QUEUE_TIMEOUT_MS); "
                             "retry later")
        self._deliver(entries, [Unavailable(message, config.retry_after_s)] * len(entries))


def _resolve(pairs: list[tuple[_Entry, object]]) -> None:
    for entry, result in pairs:
        if entry.future.done():  # cancelled meanwhile
            continue
        if isinstance(result, BaseException):
            entry.future.set_exception(result)
        else:
            entry.future.set_result((result, entry.stats))
