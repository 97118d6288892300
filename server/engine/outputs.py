"""What the engine hands back: each request's new tokens and text, its failure, the engine's state."""
from __future__ import annotations

from dataclasses import dataclass, field

from quiver.server.engine.sequence import Sequence, TokenLogprob


class RequestFailed(RuntimeError):
    """One request could not be served; the others go on. `code` names why, `status` is its HTTP status."""

    def __init__(self, message: str, code: str, status: int = 500):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output only
    seq: Sequence | None = None  # for timing metrics; read-only to consumers
    error: Exception | None = None  # the request failed (e.g. its adapter could not be read)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks in use
    preemptions: int  # so far
    adapters_resident: dict[str, int]  # tier -> adapters
    adapter_evictions: dict[str, int]  # tier -> adapters moved out of it so far
    step_failures: int  # forward passes that raised so far (each is retried without its culprit)
    healthy: bool
    unhealthy_reason: str | None = None
    # for LoRA-aware gateways (vllm:lora_requests_info): sorted distinct adapters that take LoRA device slots
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_loras: int = 0  # --max-loras
    step_adapters: int = 0  # distinct adapters (any family) among the last step's rows
