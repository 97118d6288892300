"""The LoRA family (LoRA, rsLoRA, DoRA, AdaLoRA): host copies of the read adapters, the device
slots that hold up to --max-loras of them, and the step hook that adds every token's delta.

Per layer and fused projection (qkv, o, gate_up, down) the slots are one LoraBuffers in the kernel
backend's layout (kernels.ops), a slice per module the checkpoint saves (one spanning the group for
Phi-3's fused qkv_proj and gate_up_proj), plus DoRA's (g - 1) per output column, whose last, all-zero
row serves tokens with no adapter. Which adapter sits in which slot is the registry's call.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from quiver.adapters.errors import AdapterError
from quiver.adapters.lora import LoraAdapter, load_lora
from quiver.kernels.ops import LoraBuffers, Ops
from quiver.server.families.base import Binding
from quiver.server.model.layout import checkpoint_groups, group_of, module_shapes


@dataclass
class StagedLora:
    """A read LoRA adapter, and its tensors as a slot load copies them: (layer, module) -> (A, B^T, g - 1)."""
    adapter: LoraAdapter
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass
class GroupSlots:
    weights: LoraBuffers
    dora_m1: torch.Tensor  # [slots + 1, out_total]: g - 1 (0 without DoRA; last row for base tokens)


def pin(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy (what a GPU copies from asynchronously; a name of its own so tests can stub it)."""
    return t.pin_memory()


PINNED_PER_SLOT = 2  # staged adapters pinned at once: the slots' own, and as many on their way in


class LoraFamily:
    """Pinned host memory is page-locked (the OS can neither swap nor reclaim it), so only
    PINNED_PER_SLOT x --max-loras staged adapters are pinned at once: as many as the slots hold plus as
    many read for waiting requests or just evicted. With the default --max-cpu-loras on a GPU (that same
    number) every staged adapter is pinned; a larger host tier stages the rest in pageable memory, whose
    non-blocking slot copy is still correct, only synchronous. A pin is given back when its staged copy is
    freed (the adapter left the host tier, or its read was not registered)."""

    kinds = ("lora",)

    def __init__(self, model, ops: Ops, max_loras: int, max_rank: int, files: dict):
        self.model, self.ops, self.files = model, ops, files
        self.cfg = model.cfg
        self.num_slots, self.max_rank = max_loras, max_rank
        self.order = 0
        self.adapters: dict[str, LoraAdapter] = {}  # the host-memory copies
        self.layers: list[dict[str, GroupSlots]] = []  # allocated with the first slot load
        self.fused_buffers: tuple | None = None  # what LoraStep.fused_lora gives, but the tokens' slots
        self.dora_slots: set[int] = set()
        self.pin_budget, self.pinned = PINNED_PER_SLOT * max_loras, 0  # staged adapters in pinned memory
        self.pin_lock = threading.RLock()  # stage() runs on reader threads; a release may run in any GC

    # ---- adapters ------------------------------------------------------------------------------
    def read(self, name: str, path: str) -> StagedLora:
        if self.num_slots == 0:
            raise AdapterError(f"{path}: LoRA serving is off (--max-loras 0)")
        return self.stage(load_lora(name, path, self.cfg.num_layers, module_shapes(self.cfg), self.model.base_weight,
                                    self.max_rank, **self.files))

    def stage(self, adapter: LoraAdapter | StagedLora) -> StagedLora:
        """The adapter's tensors as a slot load copies them (B transposed, in the serving dtype, pinned
        when the slots are on a GPU and the pin budget allows): done when read, off the engine thread, so
        that putting it in a slot is a few non-blocking copies. (Staged for another engine: staged again
        for this one.)"""
        if isinstance(adapter, StagedLora):
            adapter = adapter.adapter
        pinned = self.model.device.type == "cuda" and self._take_pin()
        dtype = self.model.dtype

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dtype).contiguous()
            return pin(t) if pinned else t

        try:
            staged = StagedLora(adapter, {key: (host(m.a), host(m.b.T),
                                                None if m.dora_scale is None else host(m.dora_scale - 1))
                                          for key, m in adapter.modules.items()})
        except BaseException:
            if pinned:
                self._give_pin()
            raise
        if pinned:
            weakref.finalize(staged, self._give_pin)
        return staged

    def _take_pin(self) -> bool:
        with self.pin_lock:
            if self.pinned >= self.pin_budget:
                return False
            self.pinned += 1
            return True

    def _give_pin(self) -> None:
        with self.pin_lock:
            self.pinned -= 1

    def register(self, adapter: StagedLora) -> None:
        self.adapters[adapter.name] = adapter

    def unregister(self, name: str) -> None:
        del self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def bind(self, name: str) -> Binding:
        return Binding(name, self)

    def virtual_tokens(self, name: str) -> int:
        return 0

    def info(self, name: str) -> dict:
        a = self.adapters[name].adapter
        return {"name": name, "family": "lora", "peft_type": a.spec.peft_type, "rank": a.rank,
                "target_modules": a.targets, "dora": a.uses_dora, "bytes": a.nbytes}

    # ---- device slots ----------------------------------------------------------------------------
    def _allocate(self) -> None:
        cfg, model = self.cfg, self.model
        shapes = module_shapes(cfg)
        for _ in range(cfg.num_layers):
            groups = {}
            for g, mods in checkpoint_groups(cfg).items():  # a module saved fused (Phi-3's qkv_proj): one slice
                outs = [shapes[m][0] for m in mods]
                weights = self.ops.lora_buffers(self.num_slots, self.max_rank, shapes[mods[0]][1], outs,
                                                model.dtype, model.device)
                dora = torch.zeros(self.num_slots + 1, sum(outs), dtype=model.dtype, device=model.device)
                groups[g] = GroupSlots(weights, dora)
            self.layers.append(groups)
        buffers = [g.weights for layer in self.layers for g in layer.values()]
        per_layer = len(self.layers[0])
        if buffers[0].b_blocks is not None:
            self.fused_buffers = ([w.a for w in buffers], [w.b_blocks for w in buffers],
                                  [len(w.offsets) - 1 for w in buffers[:per_layer]],
                                  [o for w in buffers[:per_layer] for o in w.offsets], buffers[0].rank)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for g in layer.values()
                   for t in (g.weights.a, g.weights.b, g.weights.b_blocks, g.dora_m1) if t is not None)

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers:
            for g in layer.values():
                self.ops.lora_clear(g.weights, slot)
                g.dora_m1[slot].zero_()
        self.dora_slots.discard(slot)

    @torch.no_grad()
    def load_slot(self, slot: int, name: str) -> None:
        if not self.layers:
            self._allocate()
        self.clear_slot(slot)
        staged = self.adapters[name]
        for (layer, module), (a, b_t, dora_m1) in staged.tensors.items():
            group, s = group_of(self.cfg, module)
            g = self.layers[layer][group]
            self.ops.lora_write(g.weights, slot, s, a, b_t)
            if dora_m1 is not None:
                lo, hi = g.weights.offsets[s], g.weights.offsets[s + 1]
                g.dora_m1[slot, lo:hi].copy_(dora_m1, non_blocking=True)
        if staged.adapter.uses_dora:
            self.dora_slots.add(slot)

    # ---- steps -----------------------------------------------------------------------------------
    def step_hook(self, step):
        token_slots = step.token_slots(self)
        if token_slots is None:
            return None
        dora = None
        if self.dora_slots and any(s in self.dora_slots for s in token_slots.unique().tolist()):
            dora = torch.where(token_slots >= 0, token_slots, self.num_slots)  # the last, all-zero row for others
        return LoraStep(self.layers, self.ops, self.ops.lora_meta(token_slots), dora, self.fused_buffers)


class LoraStep:
    """y += each token's LoRA delta; for DoRA slots also (g - 1)·(Wx) per output column."""

    UPLOAD = ("meta", "dora_index")

    def __init__(self, layers: list[dict[str, GroupSlots]], ops: Ops, meta, dora_index: torch.Tensor | None,
                 fused_buffers: tuple | None = None):
        self.layers, self.ops, self.meta = layers, ops, meta
        self.dora_index = dora_index  # [T] each token's row of dora_m1, when a DoRA adapter has tokens
        self.fused_buffers = fused_buffers  # LoraFamily.fused_buffers

    def fused_lora(self) -> tuple | None:
        """What a one-call decode loop (server.model.fused) needs to add this step's LoRA itself: (every layer's
        and group's slot buffers a and b, each group's slice count and column bounds (one after another), the
        rank), one tuple for the family's life, and each token's slot; None with DoRA rows, or when the op
        backend gives no per-token slots or blocked B (LoraBuffers.b_blocks)."""
        token_slots = getattr(self.meta, "token_slots", None)
        if self.dora_index is not None or token_slots is None or self.fused_buffers is None:
            return None
        return self.fused_buffers, token_slots

    def linear(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, bias) -> torch.Tensor:
        g = self.layers[layer][group]
        dora = None
        if self.dora_index is not None:  # DoRA: y += (g - 1) * (Wx), g per slot and column
            dora = g.dora_m1.index_select(0, self.dora_index) * (y if bias is None else y - bias)
        self.ops.lora_apply(x, y, g.weights, self.meta)
        if dora is not None:
            y += dora
        return y
