"""The one way an adapter is read from its folder, whoever asks for it: a load through the API, a
start-up flag, a request's first use of an adapter on disk, another replica's load (Ray Serve). Reads
run off the engine thread, at most READERS at once, and touch no serving state; making the result
usable is residency's (Residency.register, on the engine thread between steps).

Each read runs on a thread of its own that ends with it, never on a pool's long-lived worker: a thread
that has run a parallel torch op keeps its OpenMP team, and while it lives the engine's own parallel ops
run ~15% slower on a 2-core CPU (measured: decode steps of LoRA rows 25% slower after one pooled read).

Requests that name an adapter on disk are parked here while it is read; the engine collects them with
take_ready() once the read has finished, either way.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from quiver.adapters.fingerprint import reading
from quiver.adapters.spec import detect_family
from quiver.server.families.base import AdapterFamily

log = logging.getLogger("quiver.server.families")  # adapter management logs as one
READERS = 2  # adapter reads at once: they are file and CPU bound, and must not starve the engine of cores


@dataclass
class ReadAdapter:
    """An adapter parsed into host memory, not yet registered."""
    adapter: object
    family: AdapterFamily
    kind: str  # the family label metrics and GET /v1/adapters use
    path: str
    started: float  # when its read began (monotonic), for the load-time metric
    fingerprint: str | None = None  # its contents' hash (adapters.fingerprint): None, its KV is never cached

    @property
    def name(self) -> str:
        return self.adapter.name


class AdapterLoader:
    def __init__(self, families: list[AdapterFamily]):
        self.by_kind = {kind: f for f in families for kind in f.kinds}
        self._readers = threading.BoundedSemaphore(READERS)
        self._lock = threading.Lock()
        self._parked: dict[str, list] = {}  # adapter being read for its first use -> requests waiting for it
        self._ready: list[tuple[str, ReadAdapter | Exception]] = []  # finished first-use reads
        self.on_ready = None  # called (from a reader thread) when a first-use read has finished

    def read(self, name: str, path: str) -> ReadAdapter:
        """Parse and check an adapter folder into host memory (any thread). Raises what the family's reader
        raises (quiver.adapters.errors.AdapterError for a checkpoint it cannot serve, FileNotFoundError)."""
        started, kind = time.monotonic(), None
        try:
            kind = detect_family(path)
            family = self.by_kind[kind]
            with reading() as reads:  # the fingerprint: of the bytes this read took, as it took them
                adapter = family.read(name, path)
            return ReadAdapter(adapter, family, kind, str(path), started, reads.fingerprint())
        except Exception as exc:
            log.warning("adapter %s (%s) failed to load from %s: %s", name, kind or "family unknown", path, exc)
            raise

    def adopt(self, adapter, kind: str, path: str) -> ReadAdapter:
        """An adapter parsed in host memory elsewhere (another engine's read, a combination), staged for
        this engine's family of `kind` as its read would have left it."""
        family = self.by_kind[kind]
        return ReadAdapter(family.stage(adapter), family, kind, path, time.monotonic())

    def submit(self, name: str, path: str) -> Future:
        """read() on a reader thread of its own: a future of its ReadAdapter, or of its error."""
        future: Future = Future()

        def run() -> None:
            with self._readers:
                try:
                    future.set_result(self.read(name, path))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)

        threading.Thread(target=run, name=f"quiver-adapter-read-{name[:32]}", daemon=True).start()
        return future

    # ---- requests waiting for a first-use read ---------------------------------------------------------
    def park(self, name: str, path: str, seq) -> None:
        """Hold a request for an adapter on disk; the first one starts its read."""
        with self._lock:
            first = name not in self._parked
            self._parked.setdefault(name, []).append(seq)
        if first:
            self.submit(name, path).add_done_callback(lambda done: self._finished(name, done))

    def _finished(self, name: str, done: Future) -> None:
        with self._lock:
            self._ready.append((name, done.exception() or done.result()))
        if self.on_ready is not None:
            self.on_ready()

    def unpark(self, seq) -> None:
        with self._lock:
            waiting = self._parked.get(seq.adapter, [])
            if seq in waiting:
                waiting.remove(seq)

    def num_parked(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._parked.values())

    def has_ready(self) -> bool:
        return bool(self._ready)

    def take_ready(self) -> list[tuple[str, ReadAdapter | Exception, list]]:
        """(name, what its read gave, the requests parked on it) for every finished first-use read."""
        with self._lock:
            ready, self._ready = self._ready, []
            return [(name, result, self._parked.pop(name, [])) for name, result in ready]
