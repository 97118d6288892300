"""Which LoRA adapters are known, and which of them sit in device slots (LRU, pinned while used)."""
from __future__ import annotations

import heapq
from collections import OrderedDict

from adapters.lora import LoraAdapter

from .lora_slots import LoraSlots


class LoraManager:
    def __init__(self, slots: LoraSlots):
        self.slots = slots
        self.adapters: dict[str, LoraAdapter] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free_slots = list(range(slots.max_loras))  # a heap: lowest first keeps used slots compact
        self.loads = 0
        self.evictions = 0
        self.last_used: dict[str, int] = {}
        self._clock = 0

    def register(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        self.adapters[adapter.name] = adapter

    def lru_order(self) -> list[str]:
        """Registered adapters, least recently used first (never-activated ones first of all)."""
        return sorted(self.adapters, key=lambda n: self.last_used.get(n, -1))

    def unregister(self, name: str) -> None:
        """Forget an adapter (not in use); its slot is cleared and becomes free."""
        del self.adapters[name]
        self.last_used.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.slots.clear(slot)
            heapq.heappush(self.free_slots, slot)

    def activate(self, names: set[str]) -> dict[str, int]:
        """Put every adapter in `names` in a slot (evicting unused ones, least recently used first)."""
        if len(names) > self.slots.max_loras:
            raise RuntimeError(f"{len(names)} adapters in one step exceed --max-loras {self.slots.max_loras}")
        self._clock += 1
        for name in names:
            self.last_used[name] = self._clock
            if name in self.slot_of:
                self.slot_of.move_to_end(name)
                continue
            if not self.free_slots:
                victim = next(n for n in self.slot_of if n not in names)
                heapq.heappush(self.free_slots, self.slot_of.pop(victim))
                self.evictions += 1
            slot = heapq.heappop(self.free_slots)
            self.slots.load(slot, self.adapters[name])
            self.slot_of[name] = slot
            self.loads += 1
        return {name: self.slot_of[name] for name in names}
