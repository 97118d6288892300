"""Scheduled rows -> the tensors of one forward step, built once per step.

Tokens of all rows are laid flat ([T]); only attention looks at rows, in groups planned here.
For the torch kernels ("masked" layout) rows are packed into groups whose padding stays within a
factor of the real query-key pairs, and a row whose chunk is too long for one mask is split into
query tiles (ATTENTION_TILE), so attention memory follows the keys each query really sees, never
rows x longest chunk x longest context. For the Triton kernel ("paged"), which walks each row's
keys itself, decode rows and prefill rows form one group each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.kernels.meta import attention_tiles
from quiver.kernels.torch_ops import attention_mask
from quiver.server.engine.sequence import Sequence
from quiver.server.families.base import StepRows
from quiver.server.model.hooks import StepHooks
from quiver.server.model.upload import StepUpload


# mask elements (rows x queries x keys) one attention group may hold; padding allowed beyond the real
# query-key pairs: a factor, plus pairs small enough never to matter
ATTENTION_TILE = 1 << 25
PAD_FACTOR, PAD_FREE = 2.0, 1 << 14


@dataclass
class AttnGroup:
    query_index: torch.Tensor  # [B*Q] token index of each padded query slot
    valid_index: torch.Tensor | None  # padded slots that are real queries (None: all are)
    token_index: torch.Tensor  # [n] token index of each real query, in padded order
    max_q: int
    block_tables: torch.Tensor | None = None  # [B, NB], padding -> the always-zero block
    # "paged" layout: where the rows' queries and keys are
    q_start: torch.Tensor | None = None  # [B] token index of each row's first query
    q_lens: torch.Tensor | None = None  # [B]
    kv_offset: torch.Tensor | None = None  # [B] cache index where the row's own tokens begin
    prefix_len: torch.Tensor | None = None  # [B] adapter prefix keys at cache indices 0..prefix_len-1
    m_tiles: torch.Tensor | None = None  # [tiles, 2] int32 (row, block of queries x heads): the kernel's grid
    in_order: bool = False  # the group's query slots are the step's tokens 0..T-1 in order: no gather, no scatter
    # "masked" layout: which query sees which key, L = NB * block size
    allowed: torch.Tensor | None = None  # [B, Q, L] bool


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot for each token's K/V
    attn_groups: list[AttnGroup]
    logits_index: torch.Tensor  # [N] tokens whose next-token distribution is needed
    logits_rows: list[int]  # [N] the row of each
    sample_rows: list[int]  # row of each sampled sequence, in logits order (prompt-logprob rows excluded)
    sample_logits_pos: torch.Tensor  # [S] position in logits_index of each sampled row's last token
    prompt_logprob_spans: list[tuple[int, int, int]]  # (row, first logits pos, count)
    rows: StepRows  # what the adapter families build their step hooks from
    hooks: StepHooks = field(default_factory=StepHooks)  # the adapter effects (model.hooks)


def build_step(rows: list[tuple[Sequence, int]], block_size: int, upload: StepUpload, attention_layout: str,
               pad_block: int, heads_per_kv: int = 1) -> StepInputs:
    """The step's tensors, built on the host and handed to `upload` (the device sees them after
    upload.upload()), with attention groups in `attention_layout` ("masked" or "paged", kernels.ops);
    pad_block: a cache block that always holds zeros; heads_per_kv: query heads per KV head (the
    paged kernel's row tiles hold queries x heads of one KV head)."""
    device = upload.device
    n_rows = len(rows)
    ids: list[int] = []
    starts, lens, tables, kv_offs, prefix_lens = [], [], [], [], []
    for seq, n in rows:
        start = seq.num_computed
        ids.extend(seq.token_ids[start:start + n])
        starts.append(start)
        lens.append(n)
        tables.append(seq.block_table)
        kv_offs.append(seq.kv_offset)
        prefix_lens.append(seq.prefix_len)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [pad_block] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
    start_t = torch.tensor(starts, dtype=torch.long)
    len_t = torch.tensor(lens, dtype=torch.long)
    kv_off_t = torch.tensor(kv_offs, dtype=torch.long)
    prefix_t = torch.tensor(prefix_lens, dtype=torch.long)
    offsets = torch.cumsum(len_t, 0) - len_t
    total = int(len_t.sum())
    row_of = torch.repeat_interleave(torch.arange(n_rows), len_t)
    index = start_t[row_of] + torch.arange(total) - offsets[row_of]  # token index within its sequence
    positions = index + prefix_t[row_of]  # a prefix shifts positions (PEFT)
    cache_index = index + kv_off_t[row_of]
    slots = block_tables[row_of, cache_index // block_size] * block_size + cache_index % block_size

    if attention_layout == "paged":
        groups = [_paged_group(torch.tensor(members), start_t, len_t, offsets, block_tables, block_size, kv_off_t,
                               prefix_t, heads_per_kv)
                  for members in ([i for i, n in enumerate(lens) if n == 1], [i for i, n in enumerate(lens) if n > 1])
                  if members]
    else:
        groups = [_masked_group(items, start_t, offsets, kv_off_t, prefix_t, block_tables, block_size)
                  for items in plan_attention(starts, lens, kv_offs)]

    if len(groups) == 1:  # e.g. a decode-only step
        g = groups[0]
        g.in_order = g.valid_index is None and torch.equal(g.query_index, torch.arange(total))
    # Logits: the last token of a row that completes its prompt or decodes; every token of
    # a row that still owes prompt logprobs.
    logits_index: list[int] = []
    logits_rows: list[int] = []
    sample_rows, sample_pos, spans = [], [], []
    for r, (seq, n) in enumerate(rows):
        first, done = int(offsets[r]), starts[r] + n == seq.num_tokens
        if seq.wants_prompt_logprobs:
            spans.append((r, len(logits_index), n))
            logits_index.extend(range(first, first + n))
            logits_rows.extend([r] * n)
            if done:
                sample_rows.append(r)
                sample_pos.append(len(logits_index) - 1)
        elif done:
            sample_rows.append(r)
            sample_pos.append(len(logits_index))
            logits_index.append(first + n - 1)
            logits_rows.append(r)

    inp = StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long), positions=positions, slot_mapping=slots, attn_groups=groups,
        logits_index=torch.tensor(logits_index, dtype=torch.long), logits_rows=logits_rows, sample_rows=sample_rows,
        sample_logits_pos=torch.tensor(sample_pos, dtype=torch.long), prompt_logprob_spans=spans,
        rows=StepRows(rows, len_t, offsets.tolist(), torch.device(device), upload))
    for name in ("input_ids", "positions", "slot_mapping", "logits_index", "sample_logits_pos"):
        upload.defer(inp, name, getattr(inp, name))
    for g in groups:
        for name in ("query_index", "valid_index", "token_index", "block_tables", "q_start", "q_lens", "kv_offset",
                     "prefix_len", "allowed", "m_tiles"):
            if getattr(g, name) is not None:
                upload.defer(g, name, getattr(g, name))
    return inp


def plan_attention(starts: list[int], lens: list[int], kv_offsets: list[int]) -> list[list[tuple[int, int, int]]]:
    """Attention groups for the masked layout: lists of (row, first query, queries) items.

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


def _masked_group(items, start_t, offsets, kv_off_t, prefix_t, block_tables, block_size) -> AttnGroup:
    rows, first, q_lens = (torch.tensor(col) for col in zip(*items))
    q_start, kv_off = start_t[rows] + first, kv_off_t[rows]
    max_q = int(q_lens.max())
    nb = -(-int((kv_off + q_start + q_lens).max()) // block_size)  # blocks the rows' keys span
    group = _query_slots(offsets[rows] + first, q_lens, max_q)
    group.block_tables = block_tables[rows, :nb]
    group.allowed = attention_mask(q_start, q_lens, kv_off, prefix_t[rows], max_q, nb * block_size)
    return group


def _paged_group(members, start_t, len_t, offsets, block_tables, block_size, kv_off_t, prefix_t,
                 heads_per_kv: int) -> AttnGroup:
    q_lens, starts = len_t[members], start_t[members]
    kv_off, prefix = kv_off_t[members], prefix_t[members]
    max_q = int(q_lens.max())
    nb = -(-int((kv_off + starts + q_lens).max()) // block_size)  # blocks the rows' keys span
    group = _query_slots(offsets[members], q_lens, max_q)
    group.block_tables, group.q_start, group.q_lens = block_tables[members, :nb], starts, q_lens
    group.kv_offset, group.prefix_len = kv_off, prefix
    group.m_tiles = attention_tiles(q_lens, heads_per_kv)
    return group


def _query_slots(first: torch.Tensor, q_lens: torch.Tensor, max_q: int) -> AttnGroup:
    """A group's padded query slots: B rows of max_q queries starting at flat token `first`."""
    steps = torch.arange(max_q)
    valid = steps[None, :] < q_lens[:, None]  # [B, Q]
    query_index = torch.where(valid, first[:, None] + steps[None, :], 0).reshape(-1)
    if bool(valid.all()):
        return AttnGroup(query_index, None, query_index, max_q)
    valid_index = valid.reshape(-1).nonzero().squeeze(1)
    return AttnGroup(query_index, valid_index, query_index[valid_index], max_q)
