"""Preallocated device buffers holding the LoRA weights of up to --max-loras adapters.

Per layer and fused projection (qkv, o, gate_up, down): a [L, S*R, in] and b [L, R, out],
slot-major, rank zero-padded to --max-lora-rank, plus DoRA's (g - 1) per output column
(a last, all-zero row serves tokens with no adapter). On CPU b is block-diagonal,
[L, S*R, out] (kernels/lora_ref.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.lora import LoraAdapter

from .model_config import ModelConfig

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUP_OF = {m: (g, i) for g, mods in GROUPS.items() for i, m in enumerate(mods)}


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-targetable projection."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h),
            "v_proj": (cfg.num_kv_heads * d, h), "o_proj": (h, cfg.num_heads * d),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


@dataclass
class GroupBuffers:
    a: torch.Tensor  # [L, S*R, in]
    b: torch.Tensor  # [L, R, out_total]; on CPU [L, S*R, out_total], block-diagonal
    offsets: tuple[int, ...]  # slice boundaries along out
    dora_m1: torch.Tensor  # [L + 1, out_total]: g - 1 (0 without DoRA; last row for base tokens)
    slot_views: list[tuple[torch.Tensor, torch.Tensor]]  # CPU: (a[slot].T, b[slot]) made once, for
    # steps whose tokens all use one adapter (two matmuls, no per-call view ops)


class LoraSlots:
    """Buffers are allocated with the first adapter, so a server without adapters pays nothing."""

    def __init__(self, cfg: ModelConfig, max_loras: int, max_rank: int, dtype: torch.dtype, device):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.max_loras, self.max_rank = max_loras, max_rank
        self.layers: list[dict[str, GroupBuffers]] = []
        self.dora_slots: set[int] = set()
        self.block_diagonal = torch.device(device).type == "cpu"

    def _allocate(self) -> None:
        cfg, dtype, device, max_loras, max_rank = self.cfg, self.dtype, self.device, self.max_loras, self.max_rank
        shapes = module_shapes(cfg)
        for _ in range(cfg.num_layers):
            groups = {}
            for g, mods in GROUPS.items():
                outs = [shapes[m][0] for m in mods]
                in_f = shapes[mods[0]][1]
                offsets = tuple(sum(outs[:k]) for k in range(len(outs) + 1))
                a = torch.zeros(max_loras, len(mods) * max_rank, in_f, dtype=dtype, device=device)
                b = torch.zeros(max_loras, (len(mods) if self.block_diagonal else 1) * max_rank, offsets[-1],
                                dtype=dtype, device=device)
                views = [(a[s].T, b[s]) for s in range(max_loras)] if self.block_diagonal else []
                groups[g] = GroupBuffers(a=a, b=b, offsets=offsets, slot_views=views,
                                         dora_m1=torch.zeros(max_loras + 1, offsets[-1], dtype=dtype, device=device))
            self.layers.append(groups)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for g in layer.values()
                   for t in (g.a, g.b, g.dora_m1))

    def clear(self, slot: int) -> None:
        for layer in self.layers:
            for g in layer.values():
                g.a[slot].zero_()
                g.b[slot].zero_()
                g.dora_m1[slot].zero_()
        self.dora_slots.discard(slot)

    @torch.no_grad()
    def load(self, slot: int, adapter: LoraAdapter) -> None:
        if not self.layers:
            self._allocate()
        self.clear(slot)
        r_max = self.max_rank
        for (layer, module), m in adapter.modules.items():
            group, s = GROUP_OF[module]
            buf = self.layers[layer][group]
            r = m.a.shape[0]
            lo, hi = buf.offsets[s], buf.offsets[s + 1]
            buf.a[slot, s * r_max:s * r_max + r].copy_(m.a)
            row = s * r_max if self.block_diagonal else 0
            buf.b[slot, row:row + r, lo:hi].copy_(m.b.T)
            if m.dora_scale is not None:
                buf.dora_m1[slot, lo:hi].copy_(m.dora_scale - 1)
        if adapter.uses_dora:
            self.dora_slots.add(slot)
