"""What both backends' step metadata is made of: a step's tokens grouped by adapter slot, the row tiles
the Triton kernels launch, and the padded query slots of the torch backend's attention. Built once per step, on the host, with no
per-token Python; the backends (kernels.torch_backend, kernels.triton_backend) turn them into their own forms.

Each metadata object names its tensor fields in UPLOAD: the engine sends exactly those to the device with
the step's one host-to-device copy (a name whose value is itself such an object, or a list of them, is
followed)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ROW_TILE = 16  # rows of one SGMV program, (query, head) pairs of one attention program


@dataclass
class TokenGroups:
    """The tokens whose slot is >= 0, grouped by slot in ascending order: segment k is
    seg_index[seg_starts[k] : seg_starts[k] + seg_lens[k]], all of slot seg_slots[k]. Host tensors."""
    seg_index: torch.Tensor  # [n] token indices, sorted by slot (stable)
    seg_slots: torch.Tensor  # [S]
    seg_starts: torch.Tensor  # [S]
    seg_lens: torch.Tensor  # [S]
    segments: list[tuple[int, int, int]]  # (slot, start in seg_index, tokens), host integers
    slot_lo: int  # lowest slot used
    num_slots: int  # slot range covered: slot_lo .. slot_lo + num_slots - 1
    max_len: int  # longest segment
    first: int | None  # the grouped tokens are exactly tokens first.. in order (rows sorted by slot), else None


def group_tokens(token_slots: torch.Tensor) -> TokenGroups | None:
    """token_slots [T] int64 (-1: no adapter) -> its groups; None when no token has a slot."""
    used = token_slots >= 0
    if not bool(used.any()):
        return None
    tokens = used.nonzero().squeeze(1)
    slots_of = token_slots[tokens]
    seg_index = tokens[torch.argsort(slots_of, stable=True)]
    seg_slots, seg_lens = torch.unique_consecutive(token_slots[seg_index], return_counts=True)
    seg_starts = torch.cumsum(seg_lens, 0) - seg_lens
    lo, n = int(seg_slots.min()), int(tokens.numel())
    first = int(seg_index[0])
    in_order = torch.equal(seg_index, torch.arange(first, first + n))
    return TokenGroups(seg_index, seg_slots, seg_starts, seg_lens,
                       list(zip(seg_slots.tolist(), seg_starts.tolist(), seg_lens.tolist())), lo,
                       int(seg_slots.max()) + 1 - lo, int(seg_lens.max()), first if in_order else None)


def row_tiles(seg_lens: torch.Tensor, block: int = ROW_TILE) -> torch.Tensor:
    """[tiles, 2] int32 (segment, row block) of every `block`-row tile that holds tokens: a step launches
    programs in proportion to its tokens, not segments x its longest segment."""
    blocks = (seg_lens + block - 1) // block
    seg = torch.repeat_interleave(torch.arange(seg_lens.numel()), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    return torch.stack([seg, torch.arange(seg.numel()) - first[seg]], 1).to(torch.int32)


def attention_tiles(q_lens: torch.Tensor, heads_per_kv: int, block: int = ROW_TILE) -> torch.Tensor:
    """[tiles, 2] int32 (row, block) of the paged attention kernel's grid: a program holds `block`
    (query, head) pairs of one row and KV head, so a row of q queries needs ceil(q * heads_per_kv / block)."""
    return row_tiles(q_lens * heads_per_kv, block)


# ---- attention groups ----------------------------------------------------------------------------


@dataclass
class QuerySlots:
    """An attention group's B rows of max_q padded query slots over the step's flat tokens."""
    query_index: torch.Tensor  # [B * max_q] token index of each padded slot (padding -> 0)
    valid_index: torch.Tensor | None  # [n] the slots that are real queries (None: all are)
    token_index: torch.Tensor  # [n] token index of each real query, in slot order
    max_q: int
    in_order: bool = False  # the slots are the step's tokens 0..T-1 in order: no gather, no scatter

    UPLOAD = ("query_index", "valid_index", "token_index")


def query_slots(first: torch.Tensor, q_lens: torch.Tensor) -> QuerySlots:
    """Slots for rows whose queries are flat tokens first[b] .. first[b] + q_lens[b] - 1."""
    max_q = int(q_lens.max())
    steps = torch.arange(max_q)
    valid = steps[None, :] < q_lens[:, None]  # [B, Q]
    query_index = torch.where(valid, first[:, None] + steps[None, :], 0).reshape(-1)
    if bool(valid.all()):
        return QuerySlots(query_index, None, query_index, max_q)
    valid_index = valid.reshape(-1).nonzero().squeeze(1)
    return QuerySlots(query_index, valid_index, query_index[valid_index], max_q)


def mark_in_order(groups: list, num_tokens: int) -> None:
    """A step of one group whose slots are its tokens in order (e.g. decode only) skips the gather."""
    if len(groups) == 1:
        s = groups[0].slots
        s.in_order = s.valid_index is None and torch.equal(s.query_index, torch.arange(num_tokens))


def attend_groups(q: torch.Tensor, groups: list, attend: Callable) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]: each group's queries gathered into [B, max_q, H, D], attend(qg, group)
    run on them, and the real queries' outputs scattered back to their tokens."""
    first = groups[0].slots
    if first.in_order:
        b = q.shape[0] // first.max_q
        return attend(q.view(b, first.max_q, *q.shape[1:]), groups[0]).reshape(q.shape)
    out = torch.empty_like(q)
    for group in groups:
        s = group.slots
        b = s.query_index.shape[0] // s.max_q
        og = attend(q.index_select(0, s.query_index).view(b, s.max_q, *q.shape[1:]), group)
        og = og.reshape(b * s.max_q, *q.shape[1:])
        if s.valid_index is not None:
            og = og.index_select(0, s.valid_index)
        out.index_copy_(0, s.token_index, og)
    return out
