"""Batched multi-LoRA in PyTorch: the oracle (per-token maths) and the CPU path.

Shapes for one fused projection with S slices (q/k/v: S = 3; gate/up: 2; o, down: 1):
  x [T, in], a [L, S*R, in], b [L, R, out_total], slice offsets o_0 = 0 < ... < o_S = out_total.
lora_shrink:  xa[t] = a[slot[t]] @ x[t]                                     ([T, S*R]; 0 where slot = -1)
lora_expand:  y[t, o_s:o_{s+1}] += xa[t, s*R:(s+1)*R] @ b[slot[t], :, o_s:o_{s+1}]   for each slice s
(b is stored [R, out] so that each slice's columns are read as plain row-major blocks.)
Ranks below R are zero-padded in a and b, so they contribute exactly nothing.
"""
from __future__ import annotations

import torch

from .meta import LoraMeta, add_padded_rows, padded_rows


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot >= 0:
            rows = (token_slots == slot).nonzero().squeeze(1)
            out[rows] = x[rows] @ a[slot].T
    return out


def lora_expand_ref(xa: torch.Tensor, b: torch.Tensor, offsets: tuple[int, ...], token_slots: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    rank = b.shape[1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for s in range(len(offsets) - 1):
            lo, hi = offsets[s], offsets[s + 1]
            y[rows, lo:hi] += xa[rows, s * rank:(s + 1) * rank] @ b[slot, :, lo:hi]
    return y


def lora_apply_cpu(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   offsets: tuple[int, ...], meta: LoraMeta) -> None:
    """y += the LoRA delta of every token, as lora_expand(lora_shrink(x)) defines it.

    Padded form: one bmm per slice over all slots at once (decode-like steps). Segmented
    form: one matmul pair per adapter segment (prefill-like steps, few long segments).
    """
    rank = b.shape[1]
    n_slices = len(offsets) - 1
    if meta.padded:
        lo, n = meta.slot_lo, meta.num_slots
        xa = torch.bmm(padded_rows(x, meta), a[lo:lo + n].transpose(1, 2))
        if meta.pad_mask is not None:
            xa.mul_(meta.pad_mask)
        parts = [torch.bmm(xa[..., s * rank:(s + 1) * rank], b[lo:lo + n, :, offsets[s]:offsets[s + 1]])
                 for s in range(n_slices)]
        add_padded_rows(y, parts[0] if n_slices == 1 else torch.cat(parts, dim=-1), meta)
        return
    for slot, rows in meta.segments:
        xa = x.index_select(0, rows) @ a[slot].T
        parts = [xa[:, s * rank:(s + 1) * rank] @ b[slot, :, offsets[s]:offsets[s + 1]] for s in range(n_slices)]
        y.index_add_(0, rows, parts[0] if n_slices == 1 else torch.cat(parts, dim=-1))
