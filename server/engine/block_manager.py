"""Paged KV-cache bookkeeping: a free list of fixed-size blocks with reference counts, and the
automatic prefix cache.

Prefix caching: every full block a request computes is keyed by a hash chain over its tokens and
everything before them, and by what produced their K/V: the base ("") or an adapter's fingerprint
(adapters.fingerprint, a hash of its weights, never its name). A block nobody holds stays in the
cache, least recently used first out when a block is needed; a new request whose tokens start with
a cached chain takes those blocks and skips their prefill. Soft prompts and prefixes are not cached
(their rows' layouts are not keyed); their adapters' own prefix blocks are held as before.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from quiver.server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_shared = 0  # blocks held by their owners (adapter prefixes) rather than by requests
        self.fresh: list[int] = []  # blocks handed out and not yet zeroed (the model runner zeroes and empties it)
        self._cached: dict[int, int] = {}  # chain hash -> block holding those tokens' K/V
        self._hash_of: dict[int, int] = {}  # the reverse
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold its first `num_tokens` tokens (after its shared prefix)."""
        need = -(-(seq.kv_offset + num_tokens) // self.block_size)
        have = len(seq.block_table) or len(seq.shared_blocks)
        return max(need - have, 0)

    def can_grow(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) + reserve <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        if not seq.block_table and seq.shared_blocks:  # share the adapter's prefix blocks, read-only
            for block in seq.shared_blocks:
                self._refs[block] += 1
            seq.block_table = list(seq.shared_blocks)
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)
            self.fresh.append(block)

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        if not self._idle:
            raise RuntimeError("out of KV blocks")
        block, _ = self._idle.popitem(last=False)  # the least recently used cached block
        del self._cached[self._hash_of.pop(block)]
        return block

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq`, holding no blocks, starts with `blocks` (another sequence's full, read-only ones)."""
        assert not seq.block_table
        for block in blocks:
            self._hold(block)
        seq.block_table = list(blocks)

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def allocate_shared(self, n: int) -> list[int]:
        """Blocks held by their owner (an adapter's prefix) until release()."""
        if n > self.num_free:
            raise RuntimeError(f"{n} KV blocks needed, {self.num_free} free")
        blocks = [self._take() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        self.num_shared += n
        return blocks

    def release_shared(self, blocks) -> None:
        """The owner's hold on blocks from allocate_shared ends (requests may still share them)."""
        self.num_shared -= len(blocks)
        self.release(blocks)

    def release(self, blocks) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None  # stays cached until the space is needed
                else:
                    self._free.append(block)

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

    def refcount(self, block: int) -> int:
        return self._refs[block]

    # ---- the prefix cache ----------------------------------------------------------------------
    def match(self, seq: Sequence) -> int:
        """Give `seq` (holding no blocks) the cached blocks its tokens start with; return how many
        tokens they hold (its num_computed is set to that). At least its last token is left to compute,
        so that the step that finishes its prompt has its logits."""
        key = seq.cache_key
        if not self.caching or key is None or seq.block_table or seq.wants_prompt_logprobs:
            return 0
        bs, tokens, h = self.block_size, seq.token_ids, None
        for i in range((len(tokens) - 1) // bs):
            h = hash((h, key, tuple(tokens[i * bs:(i + 1) * bs])))
            block = self._cached.get(h)
            if block is None:
                break
            self._hold(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_computed = len(seq.block_table) * bs
        return seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """Enter the blocks `seq` has filled since the last call into the cache (after each step)."""
        bs, done = self.block_size, seq.num_computed // self.block_size
        if len(seq.block_hashes) >= done or not self.caching:
            return
        key = seq.cache_key
        if key is None:
            return
        h = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), done):
            h = hash((h, key, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
