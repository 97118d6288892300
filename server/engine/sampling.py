"""Per-request sampling parameters; each check names the offending field.

The definitions are vLLM's (which are OpenAI's and Hugging Face's where those define them):
presence and frequency penalties count output tokens only, the repetition penalty every token of
the prompt and the output, logit_bias adds to the raw logits, min_tokens holds back EOS and
stop_token_ids (and stop strings) until that many tokens are out, and min_p drops tokens whose
probability is below min_p times the top token's, after temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 5
MAX_LOGIT_BIAS = 300  # entries (OpenAI's own limit)
# the request fields (OpenAI's and vLLM's names, which are these fields' own) that from_request() takes as
# they are; the others a request's preparer computes: max_tokens, stop, logit_bias, bad_words_ids, logprobs,
# prompt_logprobs, grammar, seed
FROM_REQUEST = ("temperature", "top_p", "top_k", "min_p", "stop_token_ids", "include_stop_str_in_output",
                "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "allowed_token_ids", "skip_special_tokens")


class InvalidParam(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


GREEDY_BELOW = 1e-5  # temperatures below it are greedy, as in vLLM (_SAMPLING_EPS)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never to complete
    logprobs: int | None = None  # top-n logprobs per output token, n <= 5
    prompt_logprobs: int | None = None  # same for prompt tokens (completions' echo + logprobs)
    skip_special_tokens: bool = True
    grammar: object | None = None  # a compiled grammar (engine.grammar) the output must follow

    @classmethod
    def from_request(cls, req, **computed) -> SamplingParams:
        """`req`'s FROM_REQUEST fields (one it leaves None takes the default here), and the `computed` ones,
        which replace them (the preparer's allowed_token_ids: de-duplicated once for all choices)."""
        given = {name: value for name in FROM_REQUEST if (value := getattr(req, name)) is not None}
        return cls(**{**given, **computed})

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
        if not 0 <= self.min_p <= 1:
            raise InvalidParam("min_p", "min_p must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidParam(name, f"{name} must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 100 or not math.isfinite(self.repetition_penalty):
            raise InvalidParam("repetition_penalty", "repetition_penalty must be in (0, 100]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParam("min_tokens", "min_tokens must be an integer in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise InvalidParam(name, f"{name} must be between 0 and {MAX_LOGPROBS}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParam("logit_bias", f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise InvalidParam("logit_bias", "logit_bias values must be in [-100, 100]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidParam("allowed_token_ids", "allowed_token_ids must not be empty")
        if vocab_size is not None:
            for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias),
                              ("allowed_token_ids", self.allowed_token_ids or ())):
                if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                    raise InvalidParam(name, f"{name}: token ids must be in [0, {vocab_size})")
        return self

    @property
    def greedy(self) -> bool:
        """0, or a temperature so small that logits / temperature would overflow: the top token."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
