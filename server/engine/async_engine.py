"""Runs the engine loop on its own thread and hands outputs to asyncio, per request.

The HTTP event loop never waits on a forward step, and the engine never waits on HTTP:
adds and aborts are queued under a lock and applied between steps; outputs go back with
`call_soon_threadsafe` into each request's asyncio queue. This is the HTTP layer's only door
into the engine: what it needs is here, as methods or as read-only facts fixed at start.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.engine.outputs import RequestFailed, RequestOutput
from quiver.server.engine.requests import PreparedRequest
from quiver.server.engine.sampling import SamplingParams

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
        self.draining = False  # set on SIGTERM (drain()): new generation requests are refused, running ones finish
        self._stopped_after: float | None = None  # the grace period, once it has ended: requests now fail at once
        # facts fixed at start, safe to read from any thread
        self.model_name, self.model_dir = engine.model_name, engine.model_dir
        self.model_names, self.base_names = engine.model_names, engine.base_names  # see checkpoint.served_names
        self.dtype = str(engine.dtype).removeprefix("torch.")
        self.max_model_len, self.tokenizer = engine.max_model_len, engine.tokenizer
        self.quantization = engine.quantization  # the base's: "nf4", "fp4" or None
        self.weight_bytes = engine.weight_bytes()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        engine.on_adapter_read(self._wake.set)  # requests parked on an adapter's first read can go on
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._commands: list[tuple[Callable, concurrent.futures.Future]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

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

    def drain(self, grace_s: float) -> None:
        """Shut down gently: new generation requests are refused from now on (guard.py), and those still
        running after grace_s seconds end with a 503 error (code server_shutting_down; a stream's error
        event) and are aborted, before the HTTP server cancels its tasks."""
        self.draining = True
        timer = threading.Timer(grace_s, self.stop_requests, args=(grace_s,))
        timer.daemon = True
        timer.start()

    def stop_requests(self, grace_s: float) -> None:
        """End every request now: each gets a RequestFailed (503, server_shutting_down) and is aborted in the
        engine, with one log line; requests that start later fail at once."""
        with self._lock:
            self._stopped_after = grace_s
            rids = list(self._streams)
        for rid in rids:
            log.warning("request %s stopped: still running when the shutdown grace period (%g s) ended", rid, grace_s)
            self._deliver(rid, self._shutting_down(), last=True)
            with self._lock:
                self._aborts.append(rid)
        self._wake.set()

    def _shutting_down(self) -> RequestFailed:
        return RequestFailed(f"the server is shutting down and its grace period for running requests "
                             f"({self._stopped_after:g} s) has ended: this request was stopped; retry it",
                             code="server_shutting_down", status=503)

    def num_waiting(self) -> int:
        """Requests queued and not yet running (read from the HTTP thread; a snapshot is enough)."""
        return len(self._adds) + self.engine.num_waiting()

    # ---- requests --------------------------------------------------------------------------
    def prepare(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> PreparedRequest:
        """The request checked once, on the calling thread, before a response starts (LLMEngine.prepare);
        raises InvalidParam, UnknownAdapter or AdapterFailed."""
        return self.engine.prepare(prompt_ids, params, adapter)

    def compile_grammar(self, spec):
        """A request's grammar (engine.grammar), compiled on the calling thread; raises InvalidParam."""
        return self.engine.grammars.compile(spec)

    def discover(self, adapter: str | None) -> None:
        """Make a request's adapter known if it has appeared in --adapter-dir since the last scan (on the
        calling thread: the catalog is thread-safe; a known name costs a lookup, the base model nothing)."""
        if adapter is not None:
            self.engine.rescan(adapter)

    async def rescan(self) -> None:
        """Make folders new in --adapter-dir known (before listing adapters; a listing at most once per
        interval), off the event loop."""
        await asyncio.to_thread(self.engine.rescan)

    def known_adapters(self) -> list[str]:
        """Adapters a request may name, resident or on disk (a snapshot)."""
        return self.engine.known_adapters()

    def knows(self, adapter: str) -> bool:
        """Whether a request may name `adapter` (resident or on disk; a snapshot)."""
        return adapter in self.engine.catalog

    def virtual_tokens(self, adapter: str | None) -> int:
        """Context tokens the adapter spends before a request's own (a snapshot)."""
        return self.engine.virtual_tokens(adapter)

    def health(self) -> str | None:
        """None while the engine makes progress; else why not."""
        if self._thread is not None and not self._thread.is_alive():
            return "the engine loop has stopped"
        return self.engine.health()

    async def generate(self, request: PreparedRequest, request_id: str | None = None,
                       fork_of: str | None = None, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes; abandoning the iterator aborts it. fork_of: see
        LLMEngine.add (the request is queued when iteration starts). deadline: the event loop's time by which
        it must finish (RequestTimeout past it), counted from the request's arrival; default: now plus the
        request timeout."""
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped_after is not None:
                raise self._shutting_down()
            self._streams[rid] = (asyncio.get_running_loop(), queue)
            self._adds.append((request, rid, fork_of))
        self._wake.set()
        finished = False
        loop = asyncio.get_running_loop()
        if deadline is None and self.request_timeout is not None:
            deadline = loop.time() + self.request_timeout
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
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between two steps; the future holds its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._commands.append((fn, future))
        self._wake.set()
        return future

    async def call(self, fn: Callable):
        """submit(fn), awaited."""
        return await asyncio.wrap_future(self.submit(fn))

    async def load_adapter(self, name: str, path: str) -> dict:
        """Read the adapter on a reader thread (the batch keeps decoding), then register it between
        steps; its info."""
        read = await asyncio.wrap_future(self.engine.read_adapter(name, path))
        return await self.call(lambda engine: engine.register_adapter(read))

    async def unload_adapter(self, name: str) -> None:
        await self.call(lambda engine: engine.unload_adapter(name))

    async def list_adapters(self) -> list[dict]:
        await self.rescan()
        return await self.call(lambda engine: engine.list_adapters())

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        engine.bind_thread()
        while not self._stop:
            self._apply_pending()
            if not engine.has_work():
                self._observe()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail what was running, free everything
                log.exception("engine step failed")
                self._fail_all(EngineError(f"internal engine error: {exc}"))
                continue
            self._observe(outputs)
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)
            if not engine.ran_rows and not outputs:  # nothing could run: do not spin
                self._wake.wait(timeout=0.01)
                self._wake.clear()

    def _observe(self, outputs: list[RequestOutput] | None = None) -> None:
        """Metrics from the engine's stats and events (after a step: outputs; when idle: None, and only the
        gauges are refreshed, so that they show an abort or the last request leaving)."""
        if self.metrics is not None:
            self.metrics.observe_events(self.engine.take_events())
            if outputs is None:
                self.metrics.observe_state(self.engine.stats())
            else:
                self.metrics.observe_step(self.engine.stats(), outputs, ran_rows=self.engine.ran_rows)

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
        for request, rid, fork_of in adds:
            with self._lock:
                if rid not in self._streams:  # aborted while it waited
                    continue
            try:
                self.engine.add(request, request_id=rid, fork_of=fork_of)
            except Exception as exc:  # its adapter was unloaded since it was prepared
                self._deliver(rid, exc, last=True)

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
