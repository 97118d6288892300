"""Per-step LoRA metadata: which adapter slot each token uses, grouped once per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraMeta:
    token_slots: torch.Tensor  # [T] slot per token, -1 = no adapter
    slot_lo: int  # the padded form covers slots slot_lo .. slot_lo + num_slots - 1
    num_slots: int
    # segmented form: token indices grouped by slot
    segments: list[tuple[int, torch.Tensor]]  # (slot, token indices)
    seg_index: torch.Tensor  # [T_lora] token indices, sorted by slot
    seg_slots: torch.Tensor  # [S] slot of each segment
    seg_starts: torch.Tensor  # [S] offset of each segment in seg_index
    seg_lens: torch.Tensor  # [S]
    # padded form (CPU): slot slot_lo + i owns rows i*max_len .. (i+1)*max_len - 1
    padded: bool
    max_len: int
    pad_index: torch.Tensor | None  # [num_slots * max_len] token index, padding -> 0
    pad_mask: torch.Tensor | None  # [num_slots, max_len, 1] 1 for real rows, 0 for padding (None: no padding)
    contiguous_from: int | None  # the padded rows are exactly tokens contiguous_from.. in order: no gather needed
    dora_index: torch.Tensor | None  # [T] slot per token with -1 -> the zero row, when a DoRA slot is used
    single_slot: int | None = None  # every token of the step uses this one slot


def padded_rows(x: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """x [T, d] -> [num_slots, max_len, d] in the padded form's row order (a view when possible)."""
    n, m, start = meta.num_slots, meta.max_len, meta.contiguous_from
    if start is not None:
        return x[start:start + n * m].view(n, m, x.shape[1])
    return x.index_select(0, meta.pad_index).view(n, m, x.shape[1])


def add_padded_rows(y: torch.Tensor, delta: torch.Tensor, meta: LoraMeta) -> None:
    """y[token] += delta row for every real padded row (padding rows must already be zero)."""
    rows = delta.view(meta.num_slots * meta.max_len, -1)
    start = meta.contiguous_from
    if start is not None:
        y[start:start + rows.shape[0]] += rows
    else:
        y.index_add_(0, meta.pad_index, rows)


def build_lora_meta(token_slots: torch.Tensor, dora_slots: set[int], zero_row: int,
                    device: torch.device | str, padded: bool | None = None) -> LoraMeta | None:
    """None when no token uses an adapter: the fast path skips LoRA work entirely.

    `padded` forces the CPU form (tests); by default it is chosen from the step's shape.
    """
    used = token_slots >= 0
    if not bool(used.any()):
        return None
    lora_tokens = used.nonzero().squeeze(1)
    slots_of = token_slots[lora_tokens]
    order = torch.argsort(slots_of, stable=True)
    seg_index = lora_tokens[order]
    seg_slots, seg_lens = torch.unique_consecutive(slots_of[order], return_counts=True)
    seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
    slot_lo = int(seg_slots.min())
    num_slots = int(seg_slots.max()) + 1 - slot_lo
    max_len = int(seg_lens.max())
    n_lora = int(lora_tokens.numel())
    # padding every slot of the range to max_len rows lets one bmm serve all adapters;
    # worth it unless the padding would more than double the rows
    if padded is None:
        padded = num_slots * max_len <= 2 * n_lora + 16
    pad_index = pad_mask = contiguous_from = None
    if padded:
        pad = torch.zeros(num_slots, max_len, dtype=torch.long)
        mask = torch.zeros(num_slots, max_len, 1)
        for s, start, n in zip(seg_slots.tolist(), seg_starts.tolist(), seg_lens.tolist()):
            pad[s - slot_lo, :n] = seg_index[start:start + n]
            mask[s - slot_lo, :n] = 1
        pad_index = pad.reshape(-1)
        pad_mask = None if num_slots * max_len == n_lora else mask.to(device)
        first = int(pad_index[0])
        if pad_mask is None and torch.equal(pad_index, torch.arange(first, first + n_lora)):
            contiguous_from = first
        pad_index = pad_index.to(device)
    segments = [(s, seg_index[start:start + n].to(device))
                for s, start, n in zip(seg_slots.tolist(), seg_starts.tolist(), seg_lens.tolist())]
    dora_index = None
    if dora_slots and any(s in dora_slots for s in seg_slots.tolist()):
        dora_index = torch.where(used, token_slots, zero_row).to(device)
    to = lambda t: t.to(device)  # noqa: E731
    single = slot_lo if num_slots == 1 and n_lora == token_slots.numel() else None
    return LoraMeta(to(token_slots), slot_lo, num_slots, segments, to(seg_index), to(seg_slots), to(seg_starts),
                    to(seg_lens), padded, max_len, pad_index, pad_mask, contiguous_from, dora_index, single)
