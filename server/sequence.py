"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
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
    adapter: str | None = None
    lora_name: str | None = None  # the adapter, when it is a LoRA (it then needs a device slot)
    lora_slot: int = -1  # device slot of the adapter's LoRA weights for the current step
    bottleneck_name: str | None = None  # the adapter, when it is a bottleneck adapter
    bottleneck_slot: int = -1  # its index among the loaded bottleneck adapters, for the current step
    # soft prompt: token_ids start with num_virtual placeholders whose embeddings are soft_prompt
    num_virtual: int = 0
    soft_prompt: torch.Tensor | None = None
    # prefix KV: keys 0..prefix_len-1 of every layer live in shared blocks (prefix_blocks); the
    # sequence's own tokens start at cache index kv_offset (a block boundary) and position prefix_len
    prefix_len: int = 0
    kv_offset: int = 0
    prefix_blocks: tuple[int, ...] = ()
    blocked_steps: int = 0  # steps spent waiting on --max-loras
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
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
        if not self.token_ids:
            self.token_ids = [0] * self.num_virtual + list(self.prompt_ids)
        self.prefix_offset = self.num_virtual + max(len(self.prompt_ids) - 5, 0)
        self.read_offset = self.num_virtual + len(self.prompt_ids)

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
