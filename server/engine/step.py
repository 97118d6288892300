"""One forward step, as one object: the engine builds it, the adapter families add their hooks
(Residency.prepare), the op backend its attention metadata (ModelRunner.run), and the model reads it.
Nothing below the engine calls back up into it for what a step needs.

Tokens of all rows are laid flat ([T]); only attention looks at rows. Built once per step on the host
with no per-token Python; every tensor a step needs on the device is declared (UPLOAD) and goes over in
the step's one copy (engine.upload).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.server.engine.sampler import SamplingBatch, prepare
from quiver.server.engine.sequence import Sequence


@dataclass
class RowLayout:
    """Where each row's new tokens are, on the host: what the op backend plans attention from."""
    starts: torch.Tensor  # [B] index in its sequence of the row's first new token (tokens before it are cached)
    lens: torch.Tensor  # [B] new tokens
    offsets: torch.Tensor  # [B] flat index of the row's first new token
    kv_offsets: torch.Tensor  # [B] cache index where the row's own tokens begin (after an adapter prefix)
    prefix_lens: torch.Tensor  # [B] adapter prefix keys at cache indices 0..prefix_len - 1
    block_tables: torch.Tensor  # [B, NB] padded with the always-zero block
    block_size: int
    num_tokens: int


@dataclass
class StepHooks:
    """The adapter effects of a step, by where the model calls them (server.model.hooks says how)."""
    embed: list = field(default_factory=list)
    linear: list = field(default_factory=list)
    residual: list = field(default_factory=list)

    UPLOAD = ("embed", "linear", "residual")

    def add(self, hook) -> None:
        for point in ("embed", "linear", "residual"):
            if hasattr(hook, point):
                getattr(self, point).append(hook)


@dataclass
class Step:
    rows: list[tuple[Sequence, int]]  # (sequence, new tokens: drafts included), each adapter's rows contiguous
    layout: RowLayout
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] (an adapter prefix shifts them, as PEFT does)
    slot_mapping: torch.Tensor  # [T] cache slot of each token's K/V
    logits_index: torch.Tensor  # [N] tokens whose next-token distribution is needed, ascending
    sampled: list[Sequence]  # rows that draw a token, in logits order; a row with d drafts d + 1 times in a row
    sample_index: torch.Tensor  # [S] position in logits_index of each draw's token
    prompt_logprob_spans: list[tuple[Sequence, int, int]]  # (row, first logits position, count)
    sampling: SamplingBatch | None  # the sampled rows' parameters
    fresh_blocks: torch.Tensor  # [n] blocks handed out since the last step: zeroed before the forward writes
    hooks: StepHooks = field(default_factory=StepHooks)  # the families' (Residency.prepare)
    attention: list = field(default_factory=list)  # the op backend's groups (Ops.attention_meta)
    zeroed: bool = False  # the runner has zeroed fresh_blocks

    UPLOAD = ("input_ids", "positions", "slot_mapping", "logits_index", "sample_index", "fresh_blocks", "sampling",
              "hooks", "attention")

    def token_slots(self, family) -> torch.Tensor | None:
        """[T] int64: each token's slot in `family`, -1 for tokens of other rows; None when no row is the
        family's (slots are set by Residency.place before the step is built)."""
        slots = [seq.binding.slot if seq.binding is not None and seq.binding.family is family else -1
                 for seq, _ in self.rows]
        if max(slots) < 0:
            return None
        if self.layout.num_tokens == len(slots):  # a token a row (decode)
            return torch.tensor(slots)
        return torch.repeat_interleave(torch.tensor(slots), self.layout.lens)


def build_step(rows: list[tuple[Sequence, int]], block_size: int, pad_block: int, vocab: int,
               fresh_blocks: list[int]) -> Step:
    """rows: (sequence, new tokens) as scheduled, with their adapters already placed; pad_block: a cache
    block that always holds zeros (padding of the block tables)."""
    rows = sorted(rows, key=lambda row: (-1, -1) if row[0].binding is None else row[0].binding.sort_key)
    if all(n == 1 and not seq.draft and not seq.wants_prompt_logprobs and seq.num_computed + 1 == seq.num_tokens
           for seq, n in rows):
        return decode_step(rows, block_size, pad_block, vocab, fresh_blocks)
    return rows_step(rows, block_size, pad_block, vocab, fresh_blocks)


def decode_step(rows: list[tuple[Sequence, int]], block_size: int, pad_block: int, vocab: int,
                fresh_blocks: list[int]) -> Step:
    """rows_step's Step for rows that each decode one token (no drafts, no prompt logprobs), from a few
    lists: at low load a step's host work comes between two streams of the weights, with cold caches, and
    rows_step's two dozen tensor ops on a handful of tokens cost more there than the arithmetic."""
    seqs = [seq for seq, _ in rows]
    tables = [seq.block_table for seq in seqs]
    starts = [seq.num_computed for seq in seqs]
    kv_offs = [seq.kv_offset for seq in seqs]
    prefix_lens = [seq.prefix_len for seq in seqs]
    width = max(len(t) for t in tables)
    slots = [t[c // block_size] * block_size + c % block_size
             for t, c in zip(tables, (start + off for start, off in zip(starts, kv_offs)))]
    b = len(seqs)
    layout = RowLayout(torch.tensor(starts), torch.ones(b, dtype=torch.long), torch.arange(b), torch.tensor(kv_offs),
                       torch.tensor(prefix_lens), torch.tensor([t + [pad_block] * (width - len(t)) for t in tables]),
                       block_size, b)
    return Step(rows, layout, input_ids=torch.tensor([seq.token_ids[-1] for seq in seqs]),
                positions=torch.tensor([start + p for start, p in zip(starts, prefix_lens)]),
                slot_mapping=torch.tensor(slots), logits_index=torch.arange(b), sampled=seqs,
                sample_index=torch.arange(b), prompt_logprob_spans=[], sampling=prepare(seqs, vocab, [0] * b),
                fresh_blocks=torch.tensor(fresh_blocks, dtype=torch.long))


def rows_step(rows: list[tuple[Sequence, int]], block_size: int, pad_block: int, vocab: int,
              fresh_blocks: list[int]) -> Step:
    """build_step for any rows (sorted as it sorts them): each token's index, position and slot computed
    with tensor ops over the step's tokens, however many a prefill brings."""
    ids: list[int] = []
    starts, lens, tables, kv_offs, prefix_lens = [], [], [], [], []
    for seq, n in rows:
        start = seq.num_computed
        ids.extend(seq.token_ids[start:start + n - len(seq.draft)])
        ids.extend(seq.draft)
        starts.append(start)
        lens.append(n)
        tables.append(seq.block_table)
        kv_offs.append(seq.kv_offset)
        prefix_lens.append(seq.prefix_len)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [pad_block] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
    start_t, len_t = torch.tensor(starts, dtype=torch.long), torch.tensor(lens, dtype=torch.long)
    kv_off_t, prefix_t = torch.tensor(kv_offs, dtype=torch.long), torch.tensor(prefix_lens, dtype=torch.long)
    offsets = torch.cumsum(len_t, 0) - len_t
    total = len(ids)
    row_of = torch.repeat_interleave(torch.arange(len(rows)), len_t)
    index = start_t[row_of] + torch.arange(total) - offsets[row_of]  # token index within its sequence
    cache_index = index + kv_off_t[row_of]
    slots = block_tables[row_of, cache_index // block_size] * block_size + cache_index % block_size

    # Logits: the last token of a row that completes its prompt or decodes, and each of its drafts (one
    # draw per position: the token after its last real one, then after each draft); every token of a row
    # that still owes prompt logprobs.
    logits_index: list[int] = []
    sampled, sample_pos, draw, spans = [], [], [], []
    for (seq, n), first, start in zip(rows, offsets.tolist(), starts):
        d = len(seq.draft)
        done = start + n - d == seq.num_tokens
        if seq.wants_prompt_logprobs:
            spans.append((seq, len(logits_index), n))
            logits_index.extend(range(first, first + n))
        elif done:
            logits_index.extend(range(first + n - 1 - d, first + n))
        if done:
            sampled += [seq] * (d + 1)
            sample_pos.extend(range(len(logits_index) - 1 - d, len(logits_index)))
            draw.extend(range(d + 1))
    return Step(rows, RowLayout(start_t, len_t, offsets, kv_off_t, prefix_t, block_tables, block_size, total),
                input_ids=torch.tensor(ids, dtype=torch.long), positions=index + prefix_t[row_of], slot_mapping=slots,
                logits_index=torch.tensor(logits_index, dtype=torch.long), sampled=sampled,
                sample_index=torch.tensor(sample_pos, dtype=torch.long), prompt_logprob_spans=spans,
                sampling=prepare(sampled, vocab, draw) if sampled else None,
                fresh_blocks=torch.tensor(fresh_blocks, dtype=torch.long))
