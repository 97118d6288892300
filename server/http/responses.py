"""The API's response bodies: the routes build these, and the OpenAPI document describes them (openapi.py).

A body holds the fields its route set: `null` where the route set None (a choice's `logprobs`, an assistant's
`content` when it only calls tools), absent where it set nothing (a chunk's `usage`, most of a delta). So
bodies are written with exclude_unset, through json_body() and sse(), and as the json module writes them
(Starlette's JSONResponse compact, an event with json.dumps' defaults), whatever pydantic's own writer does.
"""
from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


def json_body(body: BaseModel) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_unset=True))


def sse(body: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body.model_dump(exclude_unset=True))}\n\n"


def stream_chunk(model: type[BaseModel], stamp: dict, choices: list, usage: BaseModel | None) -> BaseModel:
    """A streamed chunk of `model` (id, object, created, model from `stamp`): `usage` absent, not null, from
    the chunks without it."""
    return model(**stamp, choices=choices, **({} if usage is None else {"usage": usage}))


# ---- errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    error: ErrorDetail


# ---- health, models, adapters ----------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int
    quantization: Literal["nf4", "fp4"] | None = Field(description="the base model's (adapters run on it)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        description="what the base model and its adapters compute in (--dtype as resolved at start); only float32 "
                    "gives outputs exact to float32 references and independent of batch composition")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    """Fields beyond these depend on the adapter's family (rank, target_modules, virtual_tokens, ...)."""
    model_config = ConfigDict(extra="allow")

    name: str
    source: str = Field(description="its folder, relative to the adapter root (or the folder's name)")
    tier: Literal["device", "cpu", "disk", "failed"]
    requests_served: int
    family: str | None = Field(None, description="absent while the adapter is only on disk")
    bytes: int | None = None
    error: str | None = Field(None, description="why it failed to load on first use (tier failed)")


class AdapterList(BaseModel):
    object: Literal["list"]
    base_quantization: Literal["nf4", "fp4"] | None = Field(description="the base model's: every adapter runs on it")
    data: list[AdapterInfo]


class AdapterUnloaded(BaseModel):
    name: str
    unloaded: Literal[True]


# ---- generation: both APIs -------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose K/V came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# ---- /v1/completions -------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One streamed event; with stream_options.include_usage the last has no choices and the usage."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- /v1/chat/completions --------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, valid for the function's parameters schema")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is tool calls only")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """The first delta of a call has its id, type and name; later ones add to its arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One streamed event; with stream_options.include_usage the last has no choices and the usage."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
