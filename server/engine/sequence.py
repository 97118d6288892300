"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from quiver.server.engine.sampling import SamplingParams
from quiver.server.families.base import Binding


class Status(enum.Enum):
    PARKED = "parked"  # its adapter is being read from disk
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed, or one drawn for it: sampling noise depends on nothing else
    adapter: str | None = None  # the adapter the request names
    binding: Binding | None = None  # its layout and slot, once the adapter is resident (families.base)
    stop_ids: tuple[int, ...] = ()  # tokens that end it: stop_token_ids, and EOS unless ignore_eos
    grammar: object | None = None  # its grammar's matcher (engine.grammar), when the output must follow one
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks (BlockManager)
    # n > 1: the other choices wait for the first one's prompt, then share its full KV blocks (read-only)
    fork_from: Sequence | None = field(default=None, repr=False)
    forks: list[Sequence] = field(default_factory=list, repr=False)
    prompt_group: str = ""  # the request id of the first choice of its prompt (its own, unless a fork)
    blocked_steps: int = 0  # steps spent waiting on --max-loras
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of its prompt, tokens whose K/V came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list, repr=False)  # tokens proposed to verify this step (speculate)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)  # chain hashes of its full blocks in the cache
    finish_reason: str | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    prev_token_time: float | None = None  # for inter-token latency
    # incremental detokenization
    text: str = ""
    emitted_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        self.prompt_group = self.prompt_group or self.request_id
        if not self.token_ids:
            self.bind(self.binding)

    def bind(self, binding: Binding | None) -> None:
        """Lay out the tokens for the adapter: soft-prompt placeholders first, then the prompt."""
        self.binding = binding
        self.token_ids = [0] * self.num_virtual + list(self.prompt_ids)
        self.prefix_offset = self.num_virtual + max(len(self.prompt_ids) - 5, 0)
        self.read_offset = self.num_virtual + len(self.prompt_ids)

    @property
    def num_virtual(self) -> int:
        return 0 if self.binding is None else self.binding.num_virtual

    @property
    def prefix_len(self) -> int:
        return 0 if self.binding is None else self.binding.prefix_len

    @property
    def kv_offset(self) -> int:
        return 0 if self.binding is None else self.binding.kv_offset

    @property
    def shared_blocks(self) -> tuple[int, ...]:
        return () if self.binding is None else self.binding.shared_blocks

    @property
    def cache_key(self) -> str | None:
        """What its KV blocks are cached under: "" for the base, else the adapter's fingerprint; None
        (never cached) for soft prompts and prefixes, and for adapters without a fingerprint."""
        b = self.binding
        if b is None:
            return "" if self.adapter is None else None
        return None if b.num_virtual or b.prefix_len else b.cache_key

    @property
    def slot_adapter(self) -> str | None:
        """The adapter, when its family shares device slots (so it counts against --max-loras)."""
        b = self.binding
        return b.name if b is not None and b.family.num_slots else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_virtual + len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_virtual - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)
