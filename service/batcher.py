"""Dynamic batching: requests that arrive together are denoised together.

One :class:`Batcher` per replica (the local single-process server has one, every Ray Serve
replica has its own: the same class in both modes). Requests wait in a queue; the batcher takes
the oldest one and every compatible request queued behind it, up to ``max_batch``, waiting at
most ``max_wait_ms`` after the *oldest* request arrived for more to come (a request that already
waited while the previous batch ran is not made to wait again). The batch runs on one worker
thread, because the engine runs one batch at a time anyway and holds the CPU while it does.

Compatible means: the same fixed ``steps`` (the engine runs one sampler setting per forward
pass, so mixed steps would run one after the other anyway) and no streaming. A streaming
request needs a callback after every denoising step, which only :meth:`Engine.infill` offers,
so it runs as a batch of one.

Cancellation (a client that disconnected sets its item's ``cancelled`` flag):

* a request still queued is dropped before its batch starts;
* a batch of one passes the flag to the engine, which checks it between denoising steps;
* a batch of several passes one flag per request to :meth:`Engine.infill_batch`: a cancelled
  request stops denoising between two steps (its rows are no longer unmasked and it leaves the
  batch at the next block) while the batch goes on for the remaining clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from difill.inference.sampler import Cancelled, StepView

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchItem:
    """One request on its way through the batcher. ``on_step`` (streaming) runs on the worker
    thread; ``cancelled`` is set on the event loop and read by the worker (a plain attribute)."""

    request: Any  # difill.inference.engine.InfillRequest
    on_step: Callable[[StepView], None] | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # filled in when its batch starts
    queue_ms: float = 0.0
    future: asyncio.Future | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def key(self) -> tuple:
        """Items with the same key may share a batch."""
        return (self.request.steps, self.on_step is not None, id(self) if self.on_step is not None else 0)


class Overloaded(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


class EngineRunner:
    """Runs a batch on the engine (called on the batcher's worker thread)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def __call__(self, items: Sequence[BatchItem]) -> list[Any]:
        """One result or exception per item."""
        if len(items) == 1:
            item = items[0]
            try:
                return [self.engine.infill(item.request, cancel=item.is_cancelled, on_step=item.on_step)]
            except Exception as exc:  # handed to the request, never lost
                return [exc]
        try:
            return list(self.engine.infill_batch([item.request for item in items],
                                                 cancels=[item.is_cancelled for item in items]))
        except Exception as exc:  # an engine failure: each item gets it
            return [exc] * len(items)


class Batcher:
    """An asyncio dynamic batcher in front of a synchronous batch function."""

    def __init__(self, run_batch: Callable[[Sequence[BatchItem]], list[Any]], max_batch: int = 8,
                 max_wait_ms: float = 10.0, max_queue: int = 256, on_drop: Callable[[BatchItem], None] | None = None,
                 on_batch: Callable[[Sequence[BatchItem], list[Any], float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, not {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_drop = on_drop
        self._pending: deque[BatchItem] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difill-batch")
        self.running = 0  # items in the batch on the worker thread now

    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: BatchItem) -> Any:
        """Queue ``item`` and wait for its result; raises its exception (Cancelled when dropped).

        Cancelling the awaiting task (Ray Serve does on a client disconnect) cancels the item."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="difill-batcher")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} requests are queued; try again later")
        item.future = loop.create_future()
        self._pending.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            item.cancel()
            item.future.cancel()  # nobody will read its result
            if self._wakeup is not None:
                self._wakeup.set()  # a queued item leaves the queue now, not when its wait is over
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = await self._next_batch()
            except asyncio.CancelledError:
                return
            start = time.monotonic()
            for item in batch:
                item.batch_size = len(batch)
                item.queue_ms = (start - item.arrived) * 1000
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as exc:  # run_batch itself failed: every item learns why
                log.exception("batch of %d failed", len(batch))
                results = [exc] * len(batch)
            finally:
                self.running = 0
            if self.on_batch is not None:
                self.on_batch(batch, results, time.monotonic() - start)
            for item, result in zip(batch, results):
                self._settle(item, result)

    async def _next_batch(self) -> list[BatchItem]:
        """The oldest live item and the compatible ones behind it (see the module docstring)."""
        assert self._wakeup is not None
        while True:
            self._drop_cancelled()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._pending[0]
            batch = [item for item in self._pending if item.key == first.key][: self.max_batch]
            wait = first.arrived + self.max_wait_s - time.monotonic()
            if len(batch) >= self.max_batch or first.on_step is not None or wait <= 0:
                for item in batch:
                    self._pending.remove(item)
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _drop_cancelled(self) -> None:
        for item in [item for item in self._pending if item.cancelled]:
            self._pending.remove(item)
            self._settle(item, Cancelled())
            if self.on_drop is not None:
                self.on_drop(item)
            log.debug("dropped a queued request whose client is gone")

    @staticmethod
    def _settle(item: BatchItem, result: Any) -> None:
        future = item.future
        if future is None or future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    async def close(self) -> None:
        """Stop taking batches; queued requests get Cancelled."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in list(self._pending):
            self._settle(item, Cancelled())
        self._pending.clear()
        self._executor.shutdown(wait=False)
