"""What the engine hands back: each request's new tokens and text, its failure, the engine's state."""
from __future__ import annotations

from dataclasses import dataclass, field

from quiver.server.engine.sequence import Sequence, Status, TokenLogprob


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
    num_draft_tokens: int = 0  # drafts this step verified (speculate)
    num_accepted_tokens: int = 0  # of them, those accepted and emitted

    @classmethod
    def tokens(cls, seq: Sequence, tokens: list[int], text: str, logprobs: list[TokenLogprob], first: bool,
               drafted: int = 0, accepted: int = 0) -> RequestOutput:
        """seq's output for the tokens it just drew (its prompt logprobs with its first one)."""
        return cls(seq.request_id, tokens, text, logprobs, seq.finished, seq.finish_reason, seq.num_prompt_tokens,
                   seq.num_output_tokens, seq.num_cached_tokens,
                   seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None, seq,
                   num_draft_tokens=drafted, num_accepted_tokens=accepted)

    @classmethod
    def failed(cls, seq: Sequence, error: Exception) -> RequestOutput:
        return cls(seq.request_id, [], "", finished=True, finish_reason="error", seq=seq, error=error)


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
    # what is held: every count returns to its idle value once requests are gone (the invariants' check)
    kv_blocks: int = 0  # in the cache
    kv_blocks_free: int = 0  # free or cached by nobody
    kv_blocks_adapters: int = 0  # held by adapter prefixes
    kv_blocks_cached: int = 0  # entered in the prefix cache (held or not)
    lora_slots_free: int = 0  # LoRA device slots holding no adapter
    adapters_in_use: dict[str, int] = field(default_factory=dict)  # adapter -> requests holding it

    @classmethod
    def of(cls, engine) -> EngineStats:
        """The state of an LLMEngine (engine.llm_engine), read between steps."""
        reason = engine.health()
        # rows still running (finish() and schedule() drop the others already; the check keeps stats right)
        running = [seq for seq in engine.scheduler.running if seq.status is Status.RUNNING]
        waiting = engine.scheduler.waiting
        return cls(running=len(running), waiting=len(waiting), kv_usage=engine.blocks.usage,
                   preemptions=engine.num_preemptions, adapters_resident=engine.residency.resident(),
                   adapter_evictions=engine.residency.evictions(), step_failures=engine.step_failures,
                   healthy=reason is None, unhealthy_reason=reason, running_lora_adapters=_slot_adapters(running),
                   waiting_lora_adapters=_slot_adapters(waiting), max_loras=engine.config.max_loras,
                   step_adapters=engine.step_adapters, kv_blocks=engine.blocks.num_blocks,
                   kv_blocks_free=engine.blocks.num_free, kv_blocks_adapters=engine.blocks.num_shared,
                   kv_blocks_cached=engine.blocks.num_cached,
                   lora_slots_free=engine.residency.free_slots(), adapters_in_use=dict(engine.residency.pins))


def _slot_adapters(seqs) -> tuple[str, ...]:
    """The sorted distinct adapters of `seqs` that count against --max-loras (what vLLM's LoRA gauge lists)."""
    return tuple(sorted({seq.slot_adapter for seq in seqs} - {None}))
