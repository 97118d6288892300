"""Paged KV-cache bookkeeping: a free list of fixed-size blocks with reference counts."""
from __future__ import annotations

from collections import deque

from quiver.server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_shared = 0  # blocks held by their owners (adapter prefixes) rather than by requests
        self.fresh: list[int] = []  # blocks handed out and not yet zeroed (the model runner zeroes and empties it)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold its first `num_tokens` tokens (after its shared prefix)."""
        need = -(-(seq.kv_offset + num_tokens) // self.block_size)
        have = len(seq.block_table) or len(seq.shared_blocks)
        return max(need - have, 0)

    def can_grow(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) + reserve <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        if not seq.block_table and seq.shared_blocks:  # share the adapter's prefix blocks, read-only
            for block in seq.shared_blocks:
                self._refs[block] += 1
            seq.block_table = list(seq.shared_blocks)
        for _ in range(self.blocks_needed(seq, num_tokens)):
            if not self._free:
                raise RuntimeError("out of KV blocks")
            block = self._free.popleft()
            self._refs[block] = 1
            seq.block_table.append(block)
            self.fresh.append(block)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq`, holding no blocks, starts with `blocks` (another sequence's full, read-only ones)."""
        assert not seq.block_table
        for block in blocks:
            self._refs[block] += 1
        seq.block_table = list(blocks)

    def free(self, seq: Sequence) -> None:
        self.release(seq.block_table)
        seq.block_table = []

    def allocate_shared(self, n: int) -> list[int]:
        """Blocks held by their owner (an adapter's prefix) until release()."""
        if n > len(self._free):
            raise RuntimeError(f"{n} KV blocks needed, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
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
                self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refs[block]
