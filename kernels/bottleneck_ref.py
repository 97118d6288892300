"""Batched bottleneck adapters in PyTorch (the CPU path and the oracle).

For each token t with adapter slot s = slot[t] >= 0:
  y[t] += up[s]^T act_s(down[s] z[t] + down_b[s]) + up_b[s]
with down [L, m, hidden], down_b [L, m], up [L, m, hidden] (stored [m, out] like LoRA's b),
up_b [L, hidden], and act_s the slot's non-linearity. Grouping comes from the same per-step
metadata as LoRA (kernels.meta), so each step runs one bmm pair for all adapters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .meta import LoraMeta, add_padded_rows, padded_rows

ACTIVATIONS = {
    "relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "leakyrelu": F.leaky_relu,
}


def _activate(h: torch.Tensor, acts: list[str]) -> torch.Tensor:
    """h: [n, rows, m], slot i of the n uses acts[i]."""
    kinds = set(acts)
    if len(kinds) == 1:
        return ACTIVATIONS[acts[0]](h)
    out = torch.empty_like(h)
    for kind in kinds:
        idx = torch.tensor([i for i, a in enumerate(acts) if a == kind], device=h.device)
        out[idx] = ACTIVATIONS[kind](h[idx])
    return out


def bottleneck_apply_cpu(z, y, down, down_b, up, up_b, acts: list[str], meta: LoraMeta) -> None:
    if meta.padded:
        lo, n = meta.slot_lo, meta.num_slots
        h = torch.baddbmm(down_b[lo:lo + n, None, :], padded_rows(z, meta), down[lo:lo + n].transpose(1, 2))
        d = torch.baddbmm(up_b[lo:lo + n, None, :], _activate(h, acts[lo:lo + n]), up[lo:lo + n])
        if meta.pad_mask is not None:  # biases make padding rows non-zero
            d.mul_(meta.pad_mask)
        add_padded_rows(y, d, meta)
        return
    for slot, rows in meta.segments:
        h = torch.addmm(down_b[slot], z.index_select(0, rows), down[slot].T)
        y.index_add_(0, rows, torch.addmm(up_b[slot], ACTIVATIONS[acts[slot]](h), up[slot]))
