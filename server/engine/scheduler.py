"""Which rows run in the next step: running rows first, then waiting ones, within a token budget.

Every step is a mixed batch: rows that decode one token (or verify drafts: speculate), and rows that
prefill a chunk of their prompt (a long prompt is split across steps). When KV blocks run out, the most
recently arrived running row is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.sequence import Sequence, Status

# prompt tokens per step of a row that wants prompt logprobs: each gets a float32 [vocab] row of logits
# and its log-softmax, which the device's working reserve must hold (engine.device.working_reserve)
PROMPT_LOGPROB_CHUNK = 256


def chunk(seq: Sequence, budget: int, start: int) -> int:
    """Tokens from position `start` this step: what is left, within the budget, and a row owing prompt
    logprobs PROMPT_LOGPROB_CHUNK at most."""
    n = min(seq.num_tokens - start, budget)
    return min(n, PROMPT_LOGPROB_CHUNK) if seq.wants_prompt_logprobs else n


@dataclass
class ScheduledBatch:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # requests the KV cache cannot hold even empty

    def __bool__(self) -> bool:
        return bool(self.rows)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int = 0, starvation_steps: int = 32, propose=None):
        self.blocks = blocks
        self.propose = propose  # a decoding row -> its draft tokens (speculate.Proposer), or None: no speculation
        self.max_loras = max_loras
        self.starvation_steps = starvation_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # keep a few blocks free when admitting, so running rows are not preempted at once
        self.admit_reserve = max(1, blocks.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running = list(self.running)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            seq.draft = self.propose(seq)[:budget - 1] if self.propose is not None else []
            n = chunk(seq, budget, seq.num_computed) + len(seq.draft)
            if seq.draft and not self.blocks.can_grow(seq, seq.num_computed + n):
                n -= len(seq.draft)  # drafts never preempt anyone
                seq.draft = []
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victim = running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_computed + n)
                batch.rows.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: it was the last one left
        self.running = [s for s in self.running if s.status is Status.RUNNING]
        if batch.preempted:
            return batch
        # Admit in arrival order. A request whose adapter would exceed --max-loras distinct
        # adapters waits while later requests for adapters already in the batch go ahead,
        # until it has waited `starvation_steps`: then nothing overtakes it, the batch's
        # adapters drain, and it gets the freed slot.
        active = {s.slot_adapter for s in self.running if s.slot_adapter is not None}
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.fork_from is not None:  # waits for the prompt it will share
                continue
            slotted = seq.slot_adapter
            if slotted is not None and slotted not in active and len(active) >= self.max_loras:
                seq.blocked_steps += 1
                if seq.blocked_steps >= self.starvation_steps:
                    break
                continue
            if not seq.block_table:
                seq.num_cached_tokens = self.blocks.match(seq)  # skips the prefill of a cached prefix
            n = chunk(seq, budget, seq.num_computed)
            if not self.blocks.can_grow(seq, seq.num_computed + n, reserve=self.admit_reserve):
                self._unmatch(seq)
                n = chunk(seq, budget, 0)
                if self.running or batch.rows:
                    break
                if not self.blocks.can_grow(seq, seq.num_computed + n):
                    # the cache is as empty as it gets (adapter prefixes aside): this can never run
                    self.waiting.remove(seq)
                    batch.failed.append(seq)
                    continue
            self.waiting.remove(seq)
            seq.blocked_steps = 0
            if slotted is not None:
                active.add(slotted)
            self.blocks.grow(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.rows.append((seq, n))
            budget -= n
        return batch

    def _unmatch(self, seq: Sequence) -> None:
        """A waiting request not admitted after all gives its cached blocks back."""
        if seq.block_table:
            self.blocks.free(seq)
            seq.num_computed = seq.num_cached_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.draft = []
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is; its blocks go back."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
