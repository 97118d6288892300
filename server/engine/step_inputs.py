"""Scheduled rows -> the tensors of one forward step, built once per step.

Tokens of all rows are laid flat ([T]). Attention sees rows in at most two groups, decode
rows (one query each) and prefill rows (a chunk each, padded to the longest chunk), so a
long prefill never pads the decode rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.kernels.torch_ops import attention_bias
from quiver.server.engine.sequence import Sequence
from quiver.server.families.base import StepRows
from quiver.server.model.hooks import StepHooks


@dataclass
class AttnGroup:
    query_index: torch.Tensor  # [B*Q] token index of each padded query slot
    valid_index: torch.Tensor | None  # padded slots that are real queries (None: all are)
    token_index: torch.Tensor  # [n] token index of each real query, in padded order
    block_tables: torch.Tensor  # [B, NB]
    q_start: torch.Tensor  # [B] token index of each row's first query
    q_lens: torch.Tensor  # [B]
    kv_offset: torch.Tensor  # [B] cache index where the row's own tokens begin
    prefix_len: torch.Tensor  # [B] adapter prefix keys at cache indices 0..prefix_len-1
    max_q: int
    attn_bias: torch.Tensor | None  # [B, Q, NB*block_size] 0 / -inf, built once per step for the CPU path


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot for each token's K/V
    attn_groups: list[AttnGroup]
    logits_index: torch.Tensor  # [N] tokens whose next-token distribution is needed
    sample_rows: list[int]  # row of each sampled sequence, in logits order (prompt-logprob rows excluded)
    sample_logits_pos: torch.Tensor  # [S] position in logits_index of each sampled row's last token
    prompt_logprob_spans: list[tuple[int, int, int]]  # (row, first logits pos, count)
    rows: StepRows  # what the adapter families build their step hooks from
    hooks: StepHooks = field(default_factory=StepHooks)  # the adapter effects (model.hooks)


def build_step(rows: list[tuple[Sequence, int]], block_size: int, device: torch.device | str,
               attention_bias_on_host: bool) -> StepInputs:
    """The step's tensors, on `device`; attention_bias_on_host: build each group's mask once here."""
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
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
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

    groups = []
    decode = [i for i, n in enumerate(lens) if n == 1]
    prefill = [i for i, n in enumerate(lens) if n > 1]
    for members in (decode, prefill):
        if members:
            groups.append(_attn_group(torch.tensor(members), start_t, len_t, offsets, block_tables, block_size,
                                      kv_off_t, prefix_t, with_bias=attention_bias_on_host))

    # Logits: the last token of a row that completes its prompt or decodes; every token of
    # a row that still owes prompt logprobs.
    logits_index: list[int] = []
    sample_rows, sample_pos, spans = [], [], []
    for r, (seq, n) in enumerate(rows):
        first, done = int(offsets[r]), starts[r] + n == seq.num_tokens
        if seq.wants_prompt_logprobs:
            spans.append((r, len(logits_index), n))
            logits_index.extend(range(first, first + n))
            if done:
                sample_rows.append(r)
                sample_pos.append(len(logits_index) - 1)
        elif done:
            sample_rows.append(r)
            sample_pos.append(len(logits_index))
            logits_index.append(first + n - 1)

    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    for g in groups:
        for name in ("query_index", "valid_index", "token_index", "block_tables", "attn_bias", "q_start", "q_lens",
                     "kv_offset", "prefix_len"):
            value = getattr(g, name)
            if value is not None:
                setattr(g, name, to(value))
    return StepInputs(
        input_ids=to(torch.tensor(ids, dtype=torch.long)),
        positions=to(positions),
        slot_mapping=to(slots),
        attn_groups=groups,
        logits_index=to(torch.tensor(logits_index, dtype=torch.long)),
        sample_rows=sample_rows,
        sample_logits_pos=to(torch.tensor(sample_pos, dtype=torch.long)),
        prompt_logprob_spans=spans,
        rows=StepRows(rows, len_t, offsets.tolist(), torch.device(device)),
    )


def _attn_group(members, start_t, len_t, offsets, block_tables, block_size, kv_off_t, prefix_t,
                with_bias: bool) -> AttnGroup:
    q_lens, starts = len_t[members], start_t[members]
    kv_off, prefix = kv_off_t[members], prefix_t[members]
    max_q = int(q_lens.max())
    nb = -(-int((kv_off + starts + q_lens).max()) // block_size)  # blocks the rows' keys span
    tables = block_tables[members, :nb]
    steps = torch.arange(max_q)
    valid = steps[None, :] < q_lens[:, None]  # [B, Q]
    query_index = torch.where(valid, offsets[members][:, None] + steps[None, :], 0).reshape(-1)
    bias = attention_bias(starts, q_lens, kv_off, prefix, max_q, nb * block_size) if with_bias else None
    if bool(valid.all()):
        valid_index, token_index = None, query_index
    else:
        valid_index = valid.reshape(-1).nonzero().squeeze(1)
        token_index = query_index[valid_index]
    return AttnGroup(query_index, valid_index, token_index, tables, starts, q_lens, kv_off, prefix, max_q, bias)
