"""The torch kernels' per-step metadata (kernels.grouping says what it is made of): adapter tokens in
padded or segmented form, and attention rows packed into groups with one mask each.

Attention: rows are packed into groups whose padding stays within a factor of the real query-key pairs,
and a row whose chunk is too long for one mask is split into query tiles (ATTENTION_TILE), so attention
memory follows the keys each query really sees, never rows x longest chunk x longest context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quiver.kernels.grouping import QuerySlots, group_tokens, mark_in_order, query_slots

LONG_SEGMENTS = 32  # tokens per adapter from which in-order segments take a matmul pair each
# tokens up to which a step of one adapter and base rows takes the single-slot matmul pair over all its
# tokens, the base rows' shrink zeroed (decode at low load: a gather or a bmm costs more than the rows)
FEW_ROWS = 8
# mask elements (rows x queries x keys) one attention group may hold; padding allowed beyond the real
# query-key pairs: a factor, plus pairs small enough never to matter
ATTENTION_TILE = 1 << 25
PAD_FACTOR, PAD_FREE = 2.0, 1 << 14


@dataclass
class TorchAdapterMeta:
    """Which slot's weights each adapter token meets, as the torch LoRA and bottleneck ops read it.

    Padded form: slot slot_lo + i owns rows i * max_len .. (i + 1) * max_len - 1 of a [num_slots, max_len]
    layout, so one bmm pair serves every adapter. Segmented form: a matmul pair per (slot, start, n) of
    `segments`, over tokens seg_index[start:start + n]."""
    slot_lo: int
    num_slots: int
    max_len: int
    segments: list[tuple[int, int, int]]
    seg_index: torch.Tensor  # [n] token indices, grouped by slot
    padded: bool
    pad_index: torch.Tensor | None = None  # [num_slots * max_len] token index, padding -> 0
    pad_mask: torch.Tensor | None = None  # [num_slots, max_len, 1] bool, True for real rows (None: no padding)
    contiguous_from: int | None = None  # the padded rows are exactly tokens contiguous_from.. in order
    segments_from: int | None = None  # the segments are tokens segments_from.. in order: slices, no gather
    single_slot: int | None = None  # every token of the step uses this one slot, but for base_rows
    base_rows: torch.Tensor | None = None  # [T, 1] bool, True for tokens with no adapter (single_slot steps)
    token_slots: torch.Tensor | None = None  # [T] int64, the slot of each token, in steps of at most FEW_ROWS

    UPLOAD = ("seg_index", "pad_index", "pad_mask", "base_rows", "token_slots")


def torch_adapter_meta(token_slots: torch.Tensor, padded: bool | None = None) -> TorchAdapterMeta | None:
    """token_slots [T] (-1: no adapter) -> the metadata, None when no token has an adapter. The form is
    chosen from the step's shape unless `padded` forces it (tests): padding every slot of the range to
    max_len rows lets one bmm serve all adapters; worth it unless the padding would more than double the
    rows, or the segments are in order and long enough (a prefill) for a matmul pair each on plain slices.
    single_slot is set when every token uses one slot, or one slot and base rows in a step of at most
    FEW_ROWS tokens (base_rows then marks the others)."""
    g = group_tokens(token_slots)
    if g is None:
        return None
    n = int(g.seg_index.numel())
    if padded is None:
        padded = g.num_slots * g.max_len <= 2 * n + 16 and not (g.first is not None and n >= LONG_SEGMENTS * g.num_slots)
    t = token_slots.numel()
    meta = TorchAdapterMeta(g.slot_lo, g.num_slots, g.max_len, g.segments, g.seg_index, padded,
                            segments_from=g.first,
                            single_slot=g.slot_lo if g.num_slots == 1 and (n == t or t <= FEW_ROWS) else None)
    if meta.single_slot is not None and n < t:
        meta.base_rows = (token_slots < 0).unsqueeze(1)
    if t <= FEW_ROWS:
        meta.token_slots = token_slots.to(torch.long)
    if padded:
        pad = torch.zeros(g.num_slots, g.max_len, dtype=torch.long)
        mask = torch.zeros(g.num_slots, g.max_len, 1, dtype=torch.bool)
        for s, start, count in g.segments:
            pad[s - g.slot_lo, :count] = g.seg_index[start:start + count]
            mask[s - g.slot_lo, :count] = True
        meta.pad_index = pad.reshape(-1)
        meta.pad_mask = None if g.num_slots * g.max_len == n else mask
        if meta.pad_mask is None and g.first is not None:
            meta.contiguous_from = g.first
    return meta


class FewTokenMeta:
    """The LoRA metadata of a step of at most FEW_ROWS tokens where Quiver's C++ kernels serve: each token's
    slot, all that their lora_add_ and the one-call decode loop read; the grouped form (torch_adapter_meta, a
    dozen small ops) is built only if some op asks for one of its fields (a model off the CPU: then from the
    host's slots, its tensors moved to where the step's were sent)."""
    UPLOAD = ("token_slots",)

    def __init__(self, token_slots: torch.Tensor):
        self.token_slots = self._host_slots = token_slots.to(torch.long)

    def __getattr__(self, name: str):  # a field this object lacks: the grouped form's, built once
        if name.startswith("__") or "segments" in self.__dict__:
            raise AttributeError(name)
        device = self.token_slots.device
        for key, value in vars(torch_adapter_meta(self._host_slots)).items():
            self.__dict__[key] = value.to(device) if isinstance(value, torch.Tensor) else value
        return getattr(self, name)


def padded_rows(x: torch.Tensor, meta: TorchAdapterMeta) -> torch.Tensor:
    """x [T, d] -> [num_slots, max_len, d] in the padded form's row order (a view when possible)."""
    n, m, start = meta.num_slots, meta.max_len, meta.contiguous_from
    if start is not None:
        return x[start:start + n * m].view(n, m, x.shape[1])
    return x.index_select(0, meta.pad_index).view(n, m, x.shape[1])


def add_padded_rows(y: torch.Tensor, delta: torch.Tensor, meta: TorchAdapterMeta) -> None:
    """y[token] += delta row for every real padded row (padding rows must already be zero)."""
    rows = delta.view(meta.num_slots * meta.max_len, -1)
    start = meta.contiguous_from
    if start is not None:
        y[start:start + rows.shape[0]] += rows
    else:
        y.index_add_(0, meta.pad_index, rows)


# ---- attention ---------------------------------------------------------------------------------------


@dataclass
class MaskedGroup:
    """Rows of one attention call: their padded queries, block tables and which key each query sees."""
    slots: QuerySlots
    block_tables: torch.Tensor  # [B, NB], padding -> the always-zero block
    allowed: torch.Tensor  # [B, Q, NB * block size] bool
    windows: tuple[int, ...] = ()  # the model's sliding windows
    windowed: torch.Tensor | None = None  # [len(windows), B, Q, NB * block size]: `allowed` within each window

    def mask(self, window: int | None) -> torch.Tensor:
        return self.allowed if window is None else self.windowed[self.windows.index(window)]

    UPLOAD = ("slots", "block_tables", "allowed", "windowed")


def attention_mask(q_start: torch.Tensor, q_lens: torch.Tensor, kv_offset: torch.Tensor, prefix_len: torch.Tensor,
                   max_q: int, num_keys: int, window: int | None = None) -> torch.Tensor:
    """[B, max_q, num_keys] bool for paged_attention: query i of row b is the row's token q_start + i;
    it sees the row's own tokens 0..q_start + i, stored from cache index kv_offset on, and the
    adapter's prefix keys 0..prefix_len - 1. Padded queries (i >= q_lens) see what the row's last
    real query sees. With a sliding window W, only keys less than W positions back, where the prefix
    stands just before the row's tokens (its key j at position j - prefix_len, as in transformers'
    cache, where the prefix is the cache's first entries): own token p sees own tokens p - W + 1..p and
    prefix key j when p + prefix_len - j < W."""
    if max_q == 1:  # one query a row (decode)
        q_idx = q_start[:, None]
    else:
        steps = torch.arange(max_q, device=q_start.device)
        q_idx = q_start[:, None] + torch.minimum(steps[None, :], q_lens[:, None] - 1)
    key = torch.arange(num_keys, device=q_start.device)[None, None, :]
    off, prefix = kv_offset[:, None, None], prefix_len[:, None, None]
    own = (key >= off) & (key - off <= q_idx[:, :, None])
    if window is None:
        return own | (key < prefix)
    pos = torch.where(key >= off, key - off, key - prefix)  # key position; the prefix's are negative
    return (own | (key < prefix)) & (q_idx[:, :, None] - pos < window)


def masked_attention_meta(layout, windows: tuple[int, ...] = ()) -> list[MaskedGroup]:
    """The step's attention groups (layout: engine.step.RowLayout, host tensors), with a mask for each of
    the model's sliding `windows` beside the full one."""
    starts, lens, kv_offs = layout.starts.tolist(), layout.lens.tolist(), layout.kv_offsets.tolist()
    plan = plan_attention(starts, lens, kv_offs)
    if len(plan) == 1 and layout.num_tokens == len(starts):  # one decode query a row, every row in one group
        return [_decode_group(layout, max(k + s + 1 for k, s in zip(kv_offs, starts)), windows)]
    groups = [_masked_group(items, layout, windows) for items in plan]
    mark_in_order(groups, layout.num_tokens)
    return groups


def _decode_group(layout, keys: int, windows: tuple[int, ...]) -> MaskedGroup:
    """_masked_group's group of every row of a decode step (`keys`: cache index past the last key), with a few
    ops: a decode step's host work runs between two streams of the weights, with cold caches."""
    b, nb = layout.num_tokens, -(-keys // layout.block_size)
    index, ones = torch.arange(b), torch.ones(b, dtype=torch.long)
    masks = [attention_mask(layout.starts, ones, layout.kv_offsets, layout.prefix_lens, 1, nb * layout.block_size, w)
             for w in (None, *windows)]
    return MaskedGroup(QuerySlots(index, None, index, 1, in_order=True), layout.block_tables[:, :nb], masks[0],
                       windows, torch.stack(masks[1:]) if windows else None)


def plan_attention(starts: list[int], lens: list[int], kv_offsets: list[int]) -> list[list[tuple[int, int, int]]]:
    """Attention groups as lists of (row, first query, queries) items.

    A row whose mask would not fit ATTENTION_TILE is split into query tiles. Items sorted by
    (queries, keys) are packed greedily while the group's padded mask stays within PAD_FACTOR x its
    real query-key pairs (+ PAD_FREE) and within ATTENTION_TILE; each group lists its items in row
    order (a group of all the step's rows then needs no gather of its queries)."""
    items = []  # (queries, keys, row, first query)
    for row, (start, n, kv_off) in enumerate(zip(starts, lens, kv_offsets)):
        keys = kv_off + start + n  # cache index past the row's last key: what its mask spans
        tile = max(1, min(n, ATTENTION_TILE // keys))
        for first in range(0, n, tile):
            q = min(tile, n - first)
            items.append((q, kv_off + start + first + q, row, first))
    items.sort()
    groups, current = [], []
    max_q = max_k = work = 0
    for q, k, row, first in items:
        size = (len(current) + 1) * max(max_q, q) * max(max_k, k)
        if current and (size > ATTENTION_TILE or size > PAD_FACTOR * (work + q * k) + PAD_FREE):
            groups.append(sorted(current))
            current, max_q, max_k, work = [], 0, 0, 0
        current.append((row, first, q))
        max_q, max_k, work = max(max_q, q), max(max_k, k), work + q * k
    if current:
        groups.append(sorted(current))
    return groups


def _masked_group(items, layout, windows: tuple[int, ...]) -> MaskedGroup:
    rows, first, q_lens = (torch.tensor(col) for col in zip(*items))
    q_start, kv_off = layout.starts[rows] + first, layout.kv_offsets[rows]
    slots = query_slots(layout.offsets[rows] + first, q_lens)
    nb = -(-int((kv_off + q_start + q_lens).max()) // layout.block_size)  # blocks the rows' keys span
    masks = [attention_mask(q_start, q_lens, kv_off, layout.prefix_lens[rows], slots.max_q, nb * layout.block_size, w)
             for w in (None, *windows)]
    return MaskedGroup(slots, layout.block_tables[rows, :nb], masks[0], windows,
                       torch.stack(masks[1:]) if windows else None)
