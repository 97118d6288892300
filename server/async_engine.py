"""Runs the engine loop on its own thread and hands outputs to asyncio, per request.

The HTTP event loop never waits on a forward step, and the engine never waits on HTTP:
adds and aborts are queued under a lock and applied between steps; outputs go back with
`call_soon_threadsafe` into each request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from .engine import LLMEngine, RequestOutput
from .metrics import Metrics
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    pass


class RequestTimeout(EngineError):
    def __init__(self, seconds: float):
        super().__init__(f"the request ran past the server's time limit ({seconds:g} s) and was stopped")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None, request_timeout: float | None = None):
        self.engine = engine
        self.metrics = metrics
        self.request_timeout = request_timeout  # seconds from arrival to the last token; None: no limit
        self.draining = False  # set on SIGTERM: new generation requests are refused, running ones finish
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._commands: list[tuple[Callable, concurrent.futures.Future]] = []
        self._parked: dict[str, list[tuple]] = {}  # adapter on disk -> adds waiting for it to be read
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Run the engine loop in the calling thread until stop().

        `quiver serve` calls this on the main thread and serves HTTP from another: on CPU,
        torch's OpenMP matmuls measured ~25% slower when issued from a non-main thread.
        """
        self._stop = False
        self._run()

    def start(self) -> None:
        """Run the engine loop on a background thread (tests, embedding)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="quiver-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            self._thread = None

    def num_waiting(self) -> int:
        """Requests queued and not yet running (read from the HTTP thread; a snapshot is enough)."""
        parked = sum(len(v) for v in list(self._parked.values()))
        return len(self._adds) + parked + len(self.engine.scheduler.waiting)

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes; abandoning the iterator aborts it."""
        self.engine.check_request(prompt_ids, params, adapter)
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[rid] = (asyncio.get_running_loop(), queue)
            self._adds.append((prompt_ids, params, adapter, rid))
        self._wake.set()
        finished = False
        loop = asyncio.get_running_loop()
        deadline = None if self.request_timeout is None else loop.time() + self.request_timeout
        try:
            while not finished:
                if deadline is None:
                    out = await queue.get()
                else:
                    try:
                        out = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                    except asyncio.TimeoutError:
                        raise RequestTimeout(self.request_timeout) from None
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    async def call(self, fn: Callable):
        """Run fn(engine) on the engine thread between two steps; return its result or raise its error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._commands.append((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def load_adapter(self, name: str, path: str) -> dict:
        """Read the adapter on a worker thread (the batch keeps decoding), then register it between steps."""
        t0 = time.monotonic()
        adapter = await asyncio.to_thread(self.engine.read_adapter, name, path)
        info = await self.call(lambda engine: (engine.register_adapter(adapter), engine.adapter_info(name))[1])
        if self.metrics is not None:
            self.metrics.adapter_loads.labels(info["family"]).inc()
            self.metrics.adapter_load_seconds.labels(info["family"]).observe(time.monotonic() - t0)
        return info

    async def unload_adapter(self, name: str) -> None:
        def unload(engine) -> str | None:
            family = engine.adapter_info(name)["family"] if engine.is_resident(name) else None  # None: on disk
            engine.unload_adapter(name)  # UnknownAdapter for a name it does not know
            return family

        family = await self.call(unload)
        if self.metrics is not None and family is not None:
            self.metrics.adapter_unloads.labels(family).inc()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            self._apply_pending()
            if not engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail what was running, free everything
                log.exception("engine step failed")
                self._fail_all(EngineError(f"internal engine error: {exc}"))
                continue
            self.steps += 1
            if self.metrics is not None:
                self.metrics.observe_step(engine, outputs)
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)

    def _apply_pending(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
            commands, self._commands = self._commands, []
        for fn, future in commands:
            try:
                future.set_result(fn(self.engine))
            except Exception as exc:  # handed to the caller; the engine is as it was
                future.set_exception(exc)
        for rid in aborts:
            self.engine.abort(rid)
        for add in adds:
            if add[3] in aborts:
                continue
            adapter = add[2]
            if adapter is not None and not self.engine.is_resident(adapter) and adapter in self.engine.known:
                self._park(add)  # known, but on disk: read it off this thread first
            else:
                self._add(add)

    def _add(self, add: tuple) -> None:
        prompt_ids, params, adapter, rid = add
        with self._lock:
            if rid not in self._streams:  # aborted while it waited
                return
        try:
            self.engine.add_request(prompt_ids, params, adapter, request_id=rid)
        except Exception as exc:  # checked before queueing, so only a race gets here
            self._deliver(rid, exc, last=True)

    def _park(self, add: tuple) -> None:
        name = add[2]
        first = name not in self._parked
        self._parked.setdefault(name, []).append(add)
        if first:
            path = self.engine.known[name]
            threading.Thread(target=self._read_parked, args=(name, path), daemon=True).start()

    def _read_parked(self, name: str, path: str) -> None:
        """Worker thread: read the adapter, then finish on the engine thread between steps."""
        t0 = time.monotonic()
        try:
            adapter = self.engine.read_adapter(name, path)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            adapter = exc

        def finish(engine):
            parked = self._parked.pop(name, [])
            if isinstance(adapter, Exception):
                for add in parked:
                    self._deliver(add[3], adapter, last=True)
                return
            if not engine.is_resident(name):
                engine.register_adapter(adapter, keep=frozenset(self._parked))
                if self.metrics is not None:
                    self.metrics.adapter_loads.labels(adapter.family).inc()
                    self.metrics.adapter_load_seconds.labels(adapter.family).observe(time.monotonic() - t0)
            for add in parked:
                self._add(add)

        with self._lock:
            self._commands.append((finish, concurrent.futures.Future()))
        self._wake.set()

    def _deliver(self, rid: str, item, last: bool) -> None:
        with self._lock:
            target = self._streams.pop(rid, None) if last else self._streams.get(rid)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    def _fail_all(self, exc: Exception) -> None:
        for seq in self.engine.fail_all():
            self._deliver(seq.request_id, exc, last=True)
