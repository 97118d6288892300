"""Adapter residency: which adapters are read into memory and where, who uses them, and each step's
placement. The engine thread's half of adapter management (the catalog, families.catalog, is the other).

Tiers: an adapter is on `disk` (known by its folder, read on first use), in host memory (`cpu`: read, not
in a device slot; only families with device slots have this tier) or on the `device`. Families with
slots (LoRA) share --max-loras device slots, an LRU over the adapters a step does not use; beyond
--max-cpu-loras, the least recently used idle adapter of such a family goes back to disk. A pin per
request (waiting, parked or running) keeps its adapter from being unloaded or evicted from host memory.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.prompt import declared_virtual_tokens
from quiver.server.families.base import AdapterFamily, Binding
from quiver.server.families.catalog import AdapterCatalog
from quiver.server.families.errors import AdapterExists, AdapterFailed, AdapterInUse, UnknownAdapter
from quiver.server.families.loader import ReadAdapter
from quiver.server.families.slots import DeviceSlots

log = logging.getLogger("quiver.server.families")  # adapter management logs as one


@dataclass
class AdapterEvent:
    kind: str  # "load" or "unload"
    family: str | None  # None: an unload of an adapter that was only on disk
    name: str
    seconds: float | None = None  # for loads: from the start of the read to usable


class Residency:
    def __init__(self, families: list[AdapterFamily], catalog: AdapterCatalog, max_cpu_adapters: int | None = None):
        self.families, self.catalog = families, catalog
        for order, family in enumerate(families, start=1):
            family.order = order
        self.by_kind = {kind: f for f in families for kind in f.kinds}
        self.device = {f: DeviceSlots(f) for f in families if f.num_slots}
        self.max_cpu_adapters = max_cpu_adapters
        self.owner: dict[str, AdapterFamily] = {}  # resident adapters
        self.fingerprints: dict[str, str | None] = {}  # resident adapters -> what their cached KV is keyed by
        self.pins: Counter[str] = Counter()
        self.requests_served: Counter[str] = Counter()
        self.cpu_evictions = 0
        self.events: list[AdapterEvent] = []
        self._declared_cache: dict[str, tuple[int, int]] = {}  # folder on disk -> (config mtime, virtual tokens)

    # ---- registering -----------------------------------------------------------------------------
    def register(self, read: ReadAdapter, new: bool = True) -> None:
        """Make a read adapter usable (between steps); on any error nothing changes. new: the name must
        not be known at all (an API or command-line load); else it may be known on disk under the same
        folder (a first use)."""
        name, folder = read.name, self.catalog.folder(read.name)
        if name in self.owner or (new and folder is not None) or folder not in (None, read.path):
            raise AdapterExists(name)
        read.family.register(read.adapter)
        self.owner[name] = read.family
        self.fingerprints[name] = read.fingerprint
        self.catalog.know(name, read.path)
        self.events.append(AdapterEvent("load", read.kind, name, time.monotonic() - read.started))
        log.info("adapter %s (%s) loaded from %s: tier %s", name, read.kind, read.path, self.tier(name))
        self.trim(keep=name)

    def admit(self, name: str, result: ReadAdapter | Exception) -> AdapterFailed | None:
        """Register a first-use read (unless the adapter is resident by now); for a failed one, the error
        that fails its parked requests (the adapter stays failed until it is unloaded)."""
        if not isinstance(result, Exception) and not self.is_resident(name):
            try:
                self.register(result, new=False)
            except Exception as exc:  # noqa: BLE001 - handed to the parked requests
                log.warning("adapter %s (%s) failed to register: %s", name, result.kind, exc)
                result = exc
        if not isinstance(result, Exception):
            return None
        if name in self.catalog and self.catalog.changed(name):  # its folder was still being written
            self.catalog.forget(name)
            log.warning("adapter %s: its folder changed while it was read; absent until it is complete", name)
        elif name in self.catalog:  # (not unloaded meanwhile)
            self.catalog.fail(name, str(result))
            log.warning("adapter %s: tier failed, until it is unloaded", name)
        return AdapterFailed(name, str(result))

    def unregister(self, name: str) -> None:
        """Forget an adapter and free its memory; refused (AdapterInUse) while a request holds it."""
        if name not in self.catalog:
            raise UnknownAdapter(name)
        if self.pins[name]:
            raise AdapterInUse(name, self.pins[name])
        family = self.owner.pop(name, None)
        self.fingerprints.pop(name, None)
        if family is not None:
            kind = family.info(name)["family"]
            self._drop(name, family)
            log.info("adapter %s (%s) unloaded", name, kind)
        self.events.append(AdapterEvent("unload", kind if family is not None else None, name))
        self.catalog.forget(name)
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
        log.info("adapter %s (%s) evicted, tier %s (%s)", name, self.owner[name].info(name)["family"], move, why)

    # ---- names, tiers, info ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """Resident adapters (device or host memory), family by family."""
        return [n for f in self.families for n in f.names()]

    def is_resident(self, name: str) -> bool:
        return name in self.owner

    def tier(self, name: str) -> str:
        family = self.owner.get(name)
        if family is None:
            return "failed" if self.catalog.failure(name) is not None else "disk"
        return "cpu" if family in self.device and name not in self.device[family].slot_of else "device"

    def virtual_tokens(self, name: str | None) -> int:
        """Placeholder tokens a request for `name` carries (0 unless a soft prompt or prefix). Read from other
        threads too (a request's check): an adapter unloaded meanwhile counts 0, and the engine refuses its
        request when it takes it. One still on disk counts what its config declares (its first read must not
        admit a request its virtual tokens push past the context; the engine checks again once it is read)."""
        family = self.owner.get(name)
        try:
            return self._declared(name) if family is None else family.virtual_tokens(name)
        except KeyError:
            return 0

    def _declared(self, name: str | None) -> int:
        folder = None if name is None else self.catalog.folder(name)
        if folder is None:
            return 0
        try:
            stamp = (Path(folder) / "adapter_config.json").stat().st_mtime_ns
        except OSError:
            return 0
        cached = self._declared_cache.get(folder)
        if cached is None or cached[0] != stamp:
            cached = self._declared_cache[folder] = (stamp, declared_virtual_tokens(folder))
        return cached[1]

    def info(self, name: str) -> dict:
        """What GET /v1/adapters shows of a known adapter."""
        family = self.owner.get(name)
        base = {"name": name, "path": self.catalog.folder(name)}
        if family is not None:
            base.update(family.info(name))
        error = self.catalog.failure(name)
        if error is not None:
            base["error"] = error
        return {**base, "tier": self.tier(name), "requests_served": self.requests_served[name]}

    def resident(self) -> dict[str, int]:
        tiers = Counter(self.tier(n) for n in self.catalog.names())
        return {tier: tiers[tier] for tier in ("device", "cpu", "disk")}

    def free_slots(self) -> int:
        """Device slots (of every family that has them) holding no adapter."""
        return sum(len(slots.free) for slots in self.device.values())

    def evictions(self) -> dict[str, int]:
        return {"device": sum(s.evictions for s in self.device.values()), "cpu": self.cpu_evictions}

    def take_events(self) -> list[AdapterEvent]:
        events, self.events = self.events, []
        return events

    # ---- requests and steps ----------------------------------------------------------------------
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

    def place(self, bindings: list[Binding]) -> None:
        """Put a step's adapters where its kernels read them, and set each binding's slot (before the step
        is built: its rows are ordered by slot)."""
        by_family: dict[AdapterFamily, list[Binding]] = {}
        for b in bindings:
            by_family.setdefault(b.family, []).append(b)
        for family, group in by_family.items():
            if family not in self.device:
                family.place(group)
                continue
            slots = self.device[family]
            resident, evictions = list(slots.slot_of), slots.evictions
            slot_of = slots.activate({b.name for b in group})
            for b in group:
                b.slot = slot_of[b.name]
            if slots.evictions != evictions:
                for name in (n for n in resident if n not in slots.slot_of):
                    self._log_eviction(name, "device -> cpu", f"--max-loras {family.num_slots}")

    def prepare(self, step) -> None:
        """Each family with rows in the step (engine.step.Step, placed) adds the hook the model calls."""
        if any(seq.binding is not None for seq, _ in step.rows):
            for family in self.families:
                hook = family.step_hook(step)
                if hook is not None:
                    step.hooks.add(hook)
