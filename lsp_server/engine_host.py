"""The model, loaded in the background and run on one worker thread.

The engine runs one request at a time (it holds a lock and the CPU anyway), so one daemon
thread takes jobs from a queue. The asyncio side awaits a future; the worker checks a
:class:`CancelToken` before a job starts and the engine polls it between denoising steps, so a
cancelled or superseded request stops within one step. A job whose token is already cancelled
when it reaches the front of the queue is dropped without touching the model.

Daemon threads, so that a client that exits without closing our stdin never hangs the process.
On exit the server waits briefly for the worker (:meth:`EngineHost.stop`): an interpreter that
finalizes while a torch operation runs on another thread aborts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"


class CancelToken:
    """Set once, by ``$/cancelRequest`` ("cancelled"), a newer request ("superseded") or
    shutdown. The worker thread only reads ``reason`` (a plain attribute: safe under the GIL)."""

    __slots__ = ("reason", "wakeup")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.wakeup: asyncio.Future | None = None  # a debounce sleep to cut short

    def cancel(self, reason: str = "cancelled") -> None:
        """Call on the event loop thread (it may wake a sleeping coroutine)."""
        if self.reason is None:
            self.reason = reason
            if self.wakeup is not None and not self.wakeup.done():
                self.wakeup.set_result(None)

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def __call__(self) -> bool:  # the engine's ``cancel`` callable
        return self.reason is not None


class Skipped(Exception):
    """The job's token was cancelled before the job started."""


@dataclass
class _Job:
    fn: Callable[[], Any]
    token: CancelToken | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class EngineHost:
    """Owns the engine and its state for difill/status: loading, ready or failed (+ message)."""

    state: str = LOADING
    message: str = "not started"
    engine: Any = None
    load_ms: float = 0.0
    _jobs: "queue.SimpleQueue[_Job | None]" = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _generation: int = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="difill-engine", daemon=True)
            self._thread.start()

    def stop(self, wait_s: float = 0.0) -> bool:
        """Let the worker end after its current job (whose token the caller cancelled: it stops
        within one denoising step; a model load cannot be cut short), waiting up to ``wait_s``
        seconds. Whether the worker is idle or gone."""
        self._jobs.put(None)
        if self._thread is None:
            return True
        self._thread.join(wait_s)
        return not self._thread.is_alive()

    def pending(self) -> int:
        return self._jobs.qsize()

    # ---------------------------------------------------------------- loading
    def load(self, loop: asyncio.AbstractEventLoop, model: str | None, backend: str, device: str, dtype: str | None,
             on_done: Callable[[str, str], None] | None = None) -> asyncio.Future:
        """Queue a (re)load; ``on_done(state, message)`` runs on the event loop afterwards."""
        self._generation += 1
        generation = self._generation
        self.state, self.message = LOADING, f"loading {model or 'the bundled model'} ({backend}, {device})"

        def load_model() -> tuple[str, str]:
            from difill.inference.engine import Engine, EngineSettings
            from difill.inference.loader import ModelLoadError

            start = time.perf_counter()
            try:
                if model and model.startswith(("http://", "https://")):  # a `difill serve-model` service
                    from difill.service.client import RemoteEngine

                    engine = RemoteEngine(model)
                else:
                    engine = Engine.load(model, backend=backend, device=device, settings=EngineSettings(dtype=dtype))
            except (ModelLoadError, ValueError, OSError, RuntimeError, ImportError) as exc:
                return FAILED, f"cannot load the model: {exc}"
            self.load_ms = (time.perf_counter() - start) * 1000
            self._warm_up(engine)
            if generation == self._generation:
                self.engine = engine
            return READY, f"{engine.name}: {engine.n_params / 1e6:.1f}M parameters, {backend}, {device}, loaded in {self.load_ms:.0f} ms"

        future = self.submit(loop, load_model, None)

        def finished(f: asyncio.Future) -> None:
            if generation != self._generation:
                return  # a newer load was queued meanwhile
            if f.cancelled():
                self.state, self.message = FAILED, "loading was cancelled"
            elif f.exception() is not None:
                self.state, self.message = FAILED, f"cannot load the model: {f.exception()}"
            else:
                self.state, self.message = f.result()
            log.log(logging.INFO if self.state == READY else logging.ERROR, "model %s: %s", self.state, self.message)
            if on_done is not None:
                on_done(self.state, self.message)

        future.add_done_callback(finished)
        return future

    @staticmethod
    def _warm_up(engine: Any) -> None:
        """One tiny infill, so the first user request does not pay for lazy initialisation."""
        from difill.inference.engine import InfillRequest

        try:
            engine.infill(InfillRequest(prefix="x = ", suffix="\n", mode="line", max_tokens=2))
        except Exception as exc:  # a warm-up problem must not fail the load; the real request will tell
            log.warning("warm-up infill failed: %s", exc)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once the model is ready; False if it failed or did not load within the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.state == LOADING and time.monotonic() < deadline:
            await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return self.state == READY

    # ---------------------------------------------------------------- jobs
    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], token: CancelToken | None) -> asyncio.Future:
        """Run ``fn`` on the worker thread; the returned future resolves on ``loop``."""
        self.start()
        future = loop.create_future()
        self._jobs.put(_Job(fn, token, loop, future))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.future.cancelled() or (job.token is not None and job.token.cancelled):
                self._resolve(job, None, Skipped(job.token.reason if job.token else "cancelled"))
                continue
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                result, error = None, exc
            self._resolve(job, result, error)

    @staticmethod
    def _resolve(job: _Job, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: the server is exiting
            pass
