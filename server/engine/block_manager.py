"""Paged KV-cache bookkeeping: a free list of fixed-size blocks with reference counts, and the one way a
request's prompt KV is shared with another.

Every full block a request computes can be entered under a chain hash (block_hash, SHA-256) of its
tokens, everything before them, and a key for what produced their K/V. A later request whose tokens start
with a chain takes those blocks (match) and skips their prefill. A hit compares no tokens: the hash being
cryptographic is what keeps one prompt from being handed another's K/V. Two kinds of key:
- the prefix cache's (when on): "" for the base or an adapter's fingerprint (adapters.fingerprint, a
  hash of its weights, never its name), and the request's cache salt (vLLM's cache_salt; the HTTP layer
  adds the tenant), which enters the first block's hash and so every later one: only requests with the
  same salt share blocks. Any such request may take these blocks; a block nobody holds stays
  cached, least recently used first out when a block is needed. Soft prompts and prefixes are not
  cached (their sequences have no cache key);
- a prompt group's own, for the n > 1 choices of one request (LLMEngine.add's fork_of): only the group
  takes these, whatever the adapter and with the cache off, and they go with the last holder.
An adapter prefix's own blocks (allocate_shared) are held by the adapter and put at the head of each of
its requests' block tables.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from quiver.server.engine.sequence import Sequence

ROOT = bytes(32)  # the parent of a chain's first block


def block_hash(parent: bytes, key: bytes, tokens: list[int]) -> bytes:
    """The chain hash of one full block: SHA-256 over its parent's hash, what produced its K/V (key, as
    packed by fields()) and its tokens (8 bytes each, last: every part has a known length, so no two
    blocks' inputs read alike)."""
    return hashlib.sha256(parent + len(key).to_bytes(8, "little") + key + array("q", tokens).tobytes()).digest()


def fields(*parts: str) -> bytes:
    """Strings packed so that no other list of strings packs alike (each after its length)."""
    return b"".join(len(b).to_bytes(8, "little") + b for b in (p.encode("utf-8", "surrogatepass") for p in parts))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_shared = 0  # blocks held by their owners (adapter prefixes) rather than by requests
        self.fresh: list[int] = []  # blocks handed out and not yet zeroed (the engine empties it once they are)
        self._cached: dict[bytes, int] = {}  # chain hash -> block holding those tokens' K/V
        self._hash_of: dict[int, bytes] = {}  # the reverse
        self._private: set[int] = set()  # blocks entered under a prompt group's key: freed with their last holder
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
        if not seq.block_table:
            self._share_prefix(seq)
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)
            self.fresh.append(block)

    def _share_prefix(self, seq: Sequence) -> None:
        """An adapter prefix's blocks at the head of the block table, read-only."""
        for block in seq.shared_blocks:
            self._refs[block] += 1
        seq.block_table = list(seq.shared_blocks)

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        if not self._idle:
            raise RuntimeError("out of KV blocks")
        block, _ = self._idle.popitem(last=False)  # the least recently used cached block
        del self._cached[self._hash_of.pop(block)]
        return block

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
            if self._refs[block]:
                continue
            if block in self._private:  # a prompt group's: gone with its last holder
                self._private.discard(block)
                del self._cached[self._hash_of.pop(block)]
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

    # ---- sharing prompt KV ---------------------------------------------------------------------
    def _keys(self, seq: Sequence) -> tuple[bytes, bytes, bool]:
        """What seq's first block and its later ones are entered under, and whether any request may take
        them (the prefix cache) or only its prompt group. The salt enters the first block's key, and
        through its hash every later block's."""
        if self.caching and seq.cache_key is not None:
            key = fields("kv", seq.cache_key)
            return key if seq.cache_salt is None else fields("kv", seq.cache_key, "salt", seq.cache_salt), key, True
        key = fields("prompt group", seq.prompt_group)
        return key, key, False

    def match(self, seq: Sequence) -> int:
        """Give `seq` (holding no blocks of its own) the blocks entered under its key that its tokens start
        with (its num_computed is set to the tokens they hold); return how many of its prompt's tokens
        they hold (after a preemption they may hold its output too). At least its last token is left to
        compute, so that the step that finishes its prompt has its logits."""
        if seq.block_table or seq.wants_prompt_logprobs:
            return 0
        self._share_prefix(seq)
        first, key, _ = self._keys(seq)
        bs, tokens, h = self.block_size, seq.token_ids, ROOT
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(h, key if i else first, tokens[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            self._hold(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_computed = len(seq.block_hashes) * bs
        return max(min(seq.num_computed, seq.num_virtual + seq.num_prompt_tokens) - seq.num_virtual, 0)

    def commit(self, seq: Sequence) -> None:
        """Enter the blocks `seq` has filled since the last call (after each step): into the prefix cache,
        or, while choices of its prompt wait for them, under its prompt group's key."""
        bs, done = self.block_size, seq.num_computed // self.block_size
        if len(seq.block_hashes) >= done:  # most steps: no block filled since
            return
        first, key, public = self._keys(seq)
        if not (public or seq.forks):
            return
        h = seq.block_hashes[-1] if seq.block_hashes else ROOT
        head = len(seq.shared_blocks)
        for i in range(len(seq.block_hashes), done):
            h = block_hash(h, key if i else first, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[head + i]
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
                if not public:
                    self._private.add(block)

    def release_forks(self, leader: Sequence, share: bool) -> None:
        """Let the requests waiting on `leader`'s prompt (its other choices) go: once its full prompt blocks
        are computed they take them as matched blocks (share), or they compute the prompt themselves (the
        leader is gone)."""
        if not leader.forks:
            return
        full = (leader.num_virtual + leader.num_prompt_tokens - 1) // self.block_size
        if share and leader.num_computed < full * self.block_size:
            return
        for seq in leader.forks:
            seq.fork_from = None
            if share:
                self.match(seq)
        leader.forks = []
