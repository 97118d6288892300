"""Device slots of one family (LoRA's --max-loras): which adapter sits where, least recently used first out."""
from __future__ import annotations

import heapq
from collections import OrderedDict

from quiver.server.families.base import AdapterFamily


class DeviceSlots:
    """Which adapters of one family sit in its device slots: least recently used goes first."""

    def __init__(self, family: AdapterFamily):
        self.family = family
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free = list(range(family.num_slots))  # a heap: lowest first keeps used slots compact
        self.last_used: dict[str, int] = {}
        self.evictions = self._clock = 0

    def activate(self, names: set[str]) -> dict[str, int]:
        """Put every adapter in `names` in a slot (evicting others, least recently used first)."""
        if len(names) > self.family.num_slots:
            raise RuntimeError(f"{len(names)} adapters in one step exceed --max-loras {self.family.num_slots}")
        self._clock += 1
        for name in names:
            self.last_used[name] = self._clock
            if name in self.slot_of:
                self.slot_of.move_to_end(name)
                continue
            if not self.free:
                victim = next(n for n in self.slot_of if n not in names)
                heapq.heappush(self.free, self.slot_of.pop(victim))
                self.evictions += 1
            slot = heapq.heappop(self.free)
            self.family.load_slot(slot, name)
            self.slot_of[name] = slot
        return {name: self.slot_of[name] for name in names}

    def drop(self, name: str) -> None:
        self.last_used.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.family.clear_slot(slot)
            heapq.heappush(self.free, slot)

    def lru_order(self, names) -> list[str]:
        """`names`, least recently used first (never-activated ones first of all)."""
        return sorted(names, key=lambda n: self.last_used.get(n, -1))
