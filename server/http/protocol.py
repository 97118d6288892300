"""OpenAI-shaped request schemas (pydantic lives only at the HTTP edge)."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from quiver.server.engine.sampling import SamplingParams

# values that reach torch as int64 tensors (seed, top_k) must fit in one, or the engine step fails
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# Strict: JSON types as the OpenAPI document states them (no false for 0, no 1.0 for an integer;
# an integer is still a number); finite: a JSON 1e999 reads as inf
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(STRICT, extra="ignore")

    model: str | None = None
    adapter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = -1
    seed: Int64 | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=stop,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class CompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": ["Hello", "Bye"], "max_tokens": 4, "logprobs": 2, "echo": True, "seed": 7},
        {"prompt": "Once upon a time", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True},
         "logprobs": 1},
    ]})

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ContentPart(BaseModel):
    model_config = STRICT

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(STRICT, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2, "stream": True,
         "stream_options": {"include_usage": True}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
