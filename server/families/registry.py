"""The adapter registry: the one owner of adapter names, tiers and pins.

Tiers: an adapter is on `disk` (known by its folder, read on first use), in host memory (`cpu`:
read, not in a device slot; only families with device slots have this tier) or on the `device`.
Families with slots (LoRA) share --max-loras device slots, an LRU over the adapters a step does
not use; beyond --max-cpu-loras, the least recently used idle adapter of such a family goes back
to disk. A pin per request (waiting, parked or running) keeps its adapter from being unloaded or
evicted from host memory. Requests naming an adapter on disk park here while a worker thread
reads it; the engine collects them with take_ready().
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.errors import AdapterError
from quiver.adapters.fingerprint import fingerprint
from quiver.adapters.paths import InvalidName, check_name
from quiver.adapters.spec import detect_family
from quiver.server.families.base import AdapterFamily, Binding, StepRows
from quiver.server.families.errors import AdapterExists, AdapterFailed, AdapterInUse, UnknownAdapter
from quiver.server.families.slots import DeviceSlots
from quiver.server.model.hooks import StepHooks

log = logging.getLogger(__name__)


@dataclass
class ReadAdapter:
    """An adapter parsed into host memory, not yet registered."""
    adapter: object
    family: AdapterFamily
    kind: str  # the family label metrics and GET /v1/adapters use
    path: str
    started: float  # when its read began (monotonic), for the load-time metric
    fingerprint: str | None = None  # its contents' hash (adapters.fingerprint): None, its KV is never cached


@dataclass
class AdapterEvent:
    kind: str  # "load" or "unload"
    family: str
    seconds: float | None = None  # for loads: from the start of the read to usable


class AdapterRegistry:
    def __init__(self, families: list[AdapterFamily], max_cpu_adapters: int | None = None):
        self.families = families
        for order, family in enumerate(families, start=1):
            family.order = order
        self.by_kind = {kind: f for f in families for kind in f.kinds}
        self.device = {f: DeviceSlots(f) for f in families if f.num_slots}
        self.max_cpu_adapters = max_cpu_adapters
        self.known: dict[str, str] = {}  # every adapter a request may name -> its folder
        self.dirs: list[Path] = []  # --adapter-dir: scanned again for names not known yet (scan)
        self.owner: dict[str, AdapterFamily] = {}  # resident adapters
        self.failed: dict[str, str] = {}  # adapter -> why its read from disk failed
        self.fingerprints: dict[str, str | None] = {}  # resident adapters -> what their cached KV is keyed by
        self.pins: Counter[str] = Counter()
        self.requests_served: Counter[str] = Counter()
        self.cpu_evictions = 0
        self.events: list[AdapterEvent] = []
        self.on_ready = None  # called (from a worker thread) when a parked read has finished
        self._parked: dict[str, list] = {}  # adapter on disk -> requests waiting for its read
        self._ready: list[tuple[str, object]] = []  # (name, ReadAdapter or the exception) of finished reads
        self._lock = threading.Lock()

    # ---- reading and registering --------------------------------------------------------------
    def read(self, name: str, path: str) -> ReadAdapter:
        """Parse and check an adapter folder into host memory; any thread (touches no state)."""
        started, kind = time.monotonic(), None
        try:
            kind = detect_family(path)
            family = self.by_kind[kind]
            return ReadAdapter(family.read(name, path), family, kind, str(path), started, fingerprint(path))
        except Exception as exc:
            log.warning("adapter %s (%s) failed to load from %s: %s", name, kind or "family unknown", path, exc)
            raise

    def register(self, read: ReadAdapter, new: bool = True) -> None:
        """Make a read adapter usable (engine thread, between steps); on any error nothing changes.
        new: the name must not be known at all (an API or command-line load); else it may be known on
        disk under the same folder (a first use)."""
        name = read.adapter.name
        if name in self.owner or (new and name in self.known) or self.known.get(name, read.path) != read.path:
            raise AdapterExists(name)
        read.family.register(read.adapter)
        self.owner[name] = read.family
        self.fingerprints[name] = read.fingerprint
        self.known[name] = read.path
        self.events.append(AdapterEvent("load", read.kind, time.monotonic() - read.started))
        log.info("adapter %s (%s) loaded from %s: tier %s", name, read.kind, read.path, self.tier(name))
        self.trim(keep=name)

    def unregister(self, name: str) -> None:
        """Forget an adapter and free its memory; refused (AdapterInUse) while a request holds it."""
        if name not in self.known:
            raise UnknownAdapter(name)
        if self.pins[name]:
            raise AdapterInUse(name, self.pins[name])
        self.failed.pop(name, None)
        family = self.owner.pop(name, None)
        self.fingerprints.pop(name, None)
        if family is not None:
            kind = self.info(name, family)["family"]
            self._drop(name, family)
            self.events.append(AdapterEvent("unload", kind))
            log.info("adapter %s (%s) unloaded", name, kind)
        del self.known[name]
        self.requests_served.pop(name, None)

    def _drop(self, name: str, family: AdapterFamily) -> None:
        if family in self.device:
            self.device[family].drop(name)
        family.unregister(name)

    def trim(self, keep: str | None = None) -> None:
        """Beyond --max-cpu-loras, idle adapters of slot families go back to disk, least recently used
        first (after a load, and after each step: adapters busy at their read may be idle now)."""
        if self.max_cpu_adapters is None:
            return
        for family, slots in self.device.items():
            while len(family.names()) > self.max_cpu_adapters:
                idle = [n for n in slots.lru_order(family.names()) if not self.pins[n] and n != keep]
                if not idle:
                    break  # everything is in use: over the limit until requests finish
                self._log_eviction(idle[0], "cpu -> disk", f"--max-cpu-loras {self.max_cpu_adapters}")
                self._drop(idle[0], family)
                del self.owner[idle[0]]
                self.cpu_evictions += 1

    def _log_eviction(self, name: str, move: str, why: str) -> None:
        log.info("adapter %s (%s) evicted, tier %s (%s)", name, self.info(name)["family"], move, why)

    def add_dir(self, folder: str) -> list[str]:
        """Make every adapter folder in `folder` known by its folder name; each is read on first use, and
        a folder added later is found by the next scan."""
        if Path(folder) not in self.dirs:
            self.dirs.append(Path(folder))
        return self.scan([Path(folder)])

    def know(self, name: str, folder: str) -> None:
        """Make `name` known as `folder`, read on first use (an adapter loaded on another replica)."""
        self.known[name] = folder

    def scan(self, folders: list[Path] | None = None) -> list[str]:
        """Make the adapter folders in `folders` (default: every adapter dir) known; the new names."""
        added = []
        for sub in sorted(p for folder in (self.dirs if folders is None else folders) for p in folder.iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                check_name(sub.name)
            except InvalidName as exc:
                log.warning("skipping %s: %s", sub, exc)
                continue
            if sub.name not in self.known:
                self.known[sub.name] = str(sub.resolve())
                added.append(sub.name)
        return added

    # ---- names, tiers, info ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """Resident adapters (device or host memory)."""
        return [n for f in self.families for n in f.names()]

    def known_names(self) -> list[str]:
        """Every adapter a request may name: resident ones and those on disk."""
        return list(dict.fromkeys(self.names() + list(self.known)))

    def is_resident(self, name: str) -> bool:
        return name in self.owner

    def tier(self, name: str) -> str:
        family = self.owner.get(name)
        if family is None:
            return "failed" if name in self.failed else "disk"
        return "cpu" if family in self.device and name not in self.device[family].slot_of else "device"

    def virtual_tokens(self, name: str | None) -> int:
        """Placeholder tokens a request for `name` carries (0 unless a resident soft prompt or prefix)."""
        family = self.owner.get(name)
        return 0 if family is None else family.virtual_tokens(name)

    def info(self, name: str, family: AdapterFamily | None = None) -> dict:
        family = family or self.owner.get(name)
        base = {"name": name, "path": self.known[name]}
        if family is not None:
            base.update(family.info(name))
        if name in self.failed:
            base["error"] = self.failed[name]
        return {**base, "tier": self.tier(name), "requests_served": self.requests_served[name]}

    def check_usable(self, name: str) -> None:
        """Raise UnknownAdapter or AdapterFailed for a name a request may not use."""
        if name not in self.known:
            raise UnknownAdapter(name)
        if name in self.failed:
            raise AdapterFailed(name, self.failed[name])

    # ---- requests --------------------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """A request now holds `name` (until unpin): it is not unloaded or evicted from host memory."""
        self.pins[name] += 1
        self.requests_served[name] += 1

    def unpin(self, name: str) -> None:
        self.pins[name] -= 1
        if not self.pins[name]:
            del self.pins[name]

    def bind(self, name: str) -> Binding:
        binding = self.owner[name].bind(name)
        binding.cache_key = self.fingerprints.get(name)
        return binding

    def park(self, name: str, seq) -> None:
        """Hold a request for an adapter on disk; the first one starts its read on a worker thread."""
        first = name not in self._parked
        self._parked.setdefault(name, []).append(seq)
        if first:
            threading.Thread(target=self._read_parked, args=(name, self.known[name]), daemon=True).start()

    def unpark(self, seq) -> bool:
        waiting = self._parked.get(seq.adapter, [])
        if seq in waiting:
            waiting.remove(seq)
            return True
        return False

    def num_parked(self) -> int:
        return sum(len(v) for v in list(self._parked.values()))

    def _read_parked(self, name: str, path: str) -> None:
        try:
            result = self.read(name, path)
        except Exception as exc:  # noqa: BLE001 - handed to the parked requests
            result = exc
        with self._lock:
            self._ready.append((name, result))
        if self.on_ready is not None:
            self.on_ready()

    def has_ready(self) -> bool:
        return bool(self._ready)

    def take_ready(self) -> list[tuple[list, AdapterFailed | None]]:
        """Register the adapters whose reads have finished (engine thread): (their parked requests,
        None or the error that fails them) per adapter."""
        with self._lock:
            ready, self._ready = self._ready, []
        out = []
        for name, result in ready:
            if not isinstance(result, Exception) and not self.is_resident(name):
                try:
                    self.register(result, new=False)
                except Exception as exc:  # noqa: BLE001 - handed to the parked requests
                    log.warning("adapter %s (%s) failed to register: %s", name, result.kind, exc)
                    result = exc
            if isinstance(result, Exception):
                if name in self.known:  # (not unloaded meanwhile)
                    self.failed[name] = str(result)
                    log.warning("adapter %s: tier failed, until it is unloaded", name)
                result = AdapterFailed(name, str(result))
            out.append((self._parked.pop(name, []), result if isinstance(result, AdapterFailed) else None))
        return out

    # ---- steps -----------------------------------------------------------------------------------
    def begin_step(self, bindings: list[Binding]) -> None:
        """Put this step's adapters where its kernels read them, and set each binding's slot."""
        by_family: dict[AdapterFamily, list[Binding]] = {}
        for b in bindings:
            by_family.setdefault(b.family, []).append(b)
        for family, group in by_family.items():
            if family in self.device:
                slots = self.device[family]
                resident, evictions = list(slots.slot_of), slots.evictions
                slot_of = slots.activate({b.name for b in group})
                for b in group:
                    b.slot = slot_of[b.name]
                if slots.evictions != evictions:
                    for name in (n for n in resident if n not in slots.slot_of):
                        self._log_eviction(name, "device -> cpu", f"--max-loras {family.num_slots}")
            else:
                family.place(group)

    def step_hooks(self, step: StepRows) -> StepHooks:
        hooks = StepHooks()
        if not any(seq.binding is not None for seq, _ in step.rows):
            return hooks
        for family in self.families:
            hook = family.step_hook(step)
            if hook is not None:
                for point in ("embed", "linear", "residual"):
                    if hasattr(hook, point):
                        getattr(hooks, point).append(hook)
        return hooks

    # ---- observability ---------------------------------------------------------------------------
    def take_events(self) -> list[AdapterEvent]:
        events, self.events = self.events, []
        return events

    def resident(self) -> dict[str, int]:
        tiers = Counter(self.tier(n) for n in self.known)
        return {tier: tiers[tier] for tier in ("device", "cpu", "disk")}

    def device_slots(self, kind: str = "lora") -> DeviceSlots:
        """The device-slot LRU of the family serving `kind`."""
        return self.device[self.by_kind[kind]]

    def evictions(self) -> dict[str, int]:
        return {"device": sum(s.evictions for s in self.device.values()), "cpu": self.cpu_evictions}
