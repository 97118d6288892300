"""A request as the engine takes it: checked once, before anything is queued or a response starts."""
from __future__ import annotations

from dataclasses import dataclass

from quiver.server.engine.sampling import InvalidParam, SamplingParams


@dataclass(frozen=True)
class PreparedRequest:
    """Made only by LLMEngine.prepare, which checks the prompt, the sampling parameters and the context
    length; adding it re-checks only what can change meanwhile: that its adapter still exists (and its
    length, should the adapter now carry other virtual tokens). The HTTP layer sets cache_salt after (it
    changes no check): only requests with the same salt share prefix-cache blocks."""
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    virtual_tokens: int  # the adapter's when it was checked
    cache_salt: str | None = None  # the request's cache_salt and tenant (http.prepare.salted); None: unsalted


def check_length(prompt: int, max_tokens: int, virtual: int, max_model_len: int, kv) -> None:
    """Raise InvalidParam (max_tokens) when a request cannot fit the context length, or the KV cache (kv:
    engine.block_manager.BlockManager) less what adapter prefixes hold: prompt and virtual tokens and
    max_tokens, all at once."""
    block_size, blocks = kv.block_size, kv.num_blocks - kv.num_shared
    extra = f" + the adapter's {virtual} virtual tokens" if virtual else ""
    if virtual + prompt + max_tokens > max_model_len:
        raise InvalidParam("max_tokens", f"prompt ({prompt} tokens){extra} + max_tokens ({max_tokens}) exceeds the "
                                         f"context length of {max_model_len} tokens")
    need = -(-(virtual + prompt + max_tokens) // block_size)
    if need > blocks:
        raise InvalidParam("max_tokens", f"prompt ({prompt} tokens){extra} + max_tokens ({max_tokens}) needs {need} "
                                         f"KV-cache blocks; the cache has {blocks} besides the adapter prefixes it holds")


def check_prompt(prompt_ids: list[int], vocab_size: int) -> None:
    if not prompt_ids:
        raise InvalidParam("prompt", "prompt must not be empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise InvalidParam("prompt", f"token ids must be integers in [0, {vocab_size})")
