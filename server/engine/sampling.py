"""Per-request sampling parameters; each check names the offending field."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 5


class InvalidParam(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token, n <= 5
    prompt_logprobs: int | None = None  # same for prompt tokens (completions' echo + logprobs)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidParam("max_tokens", "max_tokens must be an integer >= 1")
        if self.temperature < 0:
            raise InvalidParam("temperature", "temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidParam("top_p", "top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidParam("top_k", "top_k must be >= 0 (or -1 to disable)")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise InvalidParam(name, f"{name} must be between 0 and {MAX_LOGPROBS}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be in [0, {vocab_size})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
