"""What an adapter family is to the engine: one protocol, and the binding of a request to an adapter.

A family reads its checkpoints (through quiver.adapters), holds their device copies, binds requests
to them, and gives the model its per-step hooks (quiver.server.model.hooks). The catalog
(families.catalog) owns names and folders, residency (families.residency) tiers, pins and placement,
the loader (families.loader) reads; the engine core sees only Bindings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(eq=False)
class Binding:
    """One request's adapter, as the engine core sees it: its token and KV-cache layout, and the
    device slot it uses in the current step."""
    name: str
    family: AdapterFamily
    num_virtual: int = 0  # soft-prompt placeholders at the head of the request's tokens
    soft_prompt: torch.Tensor | None = None  # [num_virtual, hidden]: their embeddings
    prefix_len: int = 0  # the adapter's prefix keys, at cache indices 0..prefix_len-1; positions start here
    kv_offset: int = 0  # cache index (a block boundary) where the request's own tokens start
    shared_blocks: tuple[int, ...] = ()  # KV blocks shared read-only at the head of the block table
    slot: int = -1  # device slot of the adapter in the current step (families with slots)
    cache_key: str | None = None  # the adapter's fingerprint: what its cached KV blocks are keyed by

    @property
    def sort_key(self) -> tuple[int, int]:
        """Rows of a step are ordered by this, so that each adapter's tokens are contiguous."""
        return self.family.order, self.slot


class AdapterFamily(Protocol):
    kinds: tuple[str, ...]  # what quiver.adapters.spec.detect_family calls the checkpoints it serves
    num_slots: int  # device slots its adapters share per step (the registry's LRU), 0: none
    order: int  # set by the registry: rows sort by family, then slot

    def read(self, name: str, path: str):
        """Parse and check an adapter folder into host memory (any thread; touches no family state).
        Raises quiver.adapters.errors.AdapterError for a checkpoint it cannot serve."""

    def stage(self, adapter):
        """A parsed adapter (quiver.adapters) in the form register() takes, made off the engine thread
        (read() returns it staged already)."""

    def register(self, adapter) -> None:
        """Make a read adapter usable (engine thread, between steps); raise to refuse it unchanged."""

    def unregister(self, name: str) -> None:
        """Forget an adapter no request uses and free what it held."""

    def names(self) -> list[str]:
        """Registered adapters."""

    def bind(self, name: str) -> Binding:
        """A new request's binding to a registered adapter."""

    def virtual_tokens(self, name: str) -> int:
        """Tokens of the context a request of this adapter spends before its own (soft prompt, prefix)."""

    def place(self, bindings: list[Binding]) -> None:
        """Set binding.slot for this step (families without an LRU of slots; others: the registry does)."""

    def load_slot(self, slot: int, name: str) -> None:
        """Copy an adapter into a device slot (families with num_slots)."""

    def clear_slot(self, slot: int) -> None:
        """Zero a device slot (families with num_slots)."""

    def step_hook(self, step):
        """The object the model calls for this step's rows (an EmbedHook, LinearHook or ResidualHook
        of quiver.server.model.hooks), or None when no row uses this family. step: engine.step.Step, its
        adapters placed; the hook names its host tensors in UPLOAD (engine.upload sends them)."""

    def info(self, name: str) -> dict:
        """What GET /v1/adapters shows of a registered adapter (family, sizes, bytes, path)."""
