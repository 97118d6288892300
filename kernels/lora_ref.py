"""Batched multi-LoRA in PyTorch: the oracle (per-token maths) and the CPU path.

Shapes for one fused projection with S slices (q/k/v: S = 3; gate/up: 2; o, down: 1):
  x [T, in], a [L, S*R, in], b [L, R, out_total], slice offsets o_0 = 0 < ... < o_S = out_total.
lora_shrink:  xa[t] = a[slot[t]] @ x[t]                                     ([T, S*R]; 0 where slot = -1)
lora_expand:  y[t, o_s:o_{s+1}] += xa[t, s*R:(s+1)*R] @ b[slot[t], :, o_s:o_{s+1}]   for each slice s
(b is stored [R, out] so that each slice's columns are read as plain row-major blocks.)
Ranks below R are zero-padded in a and b, so they contribute exactly nothing.

The CPU path keeps b block-diagonal instead, [L, S*R, out_total] (see block_diagonal): the
expand of every slice is then one matmul, y += xa @ b[slot], and tiny decode steps pay for two
matmuls per projection rather than 1 + S.
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


def block_diagonal(b: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """[L, R, out] -> [L, S*R, out]: slice s's rank rows moved to rows s*R.., zeros elsewhere."""
    n_slices, rank = len(offsets) - 1, b.shape[1]
    out = b.new_zeros(b.shape[0], n_slices * rank, b.shape[2])
    for s in range(n_slices):
        lo, hi = offsets[s], offsets[s + 1]
        out[:, s * rank:(s + 1) * rank, lo:hi] = b[:, :, lo:hi]
    return out


def lora_apply_cpu(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoraMeta) -> None:
    """y += the LoRA delta of every token, b block-diagonal ([L, S*R, out]).

    Padded form: one bmm pair over all slots at once (decode-like steps), added in place when
    the rows are contiguous. Segmented form: one matmul pair per adapter segment (prefill-like
    steps, few long segments).
    """
    if meta.padded:
        lo, n, m = meta.slot_lo, meta.num_slots, meta.max_len
        if meta.contiguous_from is not None:  # no padding, no gather: accumulate straight into y
            rows = slice(meta.contiguous_from, meta.contiguous_from + n * m)
            if n == 1:
                y[rows].addmm_(x[rows] @ a[lo].T, b[lo])
            else:
                y[rows].view(n, m, -1).baddbmm_(torch.bmm(x[rows].view(n, m, -1), a[lo:lo + n].transpose(1, 2)),
                                                b[lo:lo + n])
            return
        xa = torch.bmm(padded_rows(x, meta), a[lo:lo + n].transpose(1, 2))
        if meta.pad_mask is not None:
            xa.mul_(meta.pad_mask)
        add_padded_rows(y, torch.bmm(xa, b[lo:lo + n]), meta)
        return
    for slot, rows in meta.segments:
        y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].T) @ b[slot])
