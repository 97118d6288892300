"""OpenAI-shaped request schemas (pydantic lives only at the HTTP edge).

Every field of OpenAI's and vLLM's completion and chat requests is one of three things here: applied
(declared below), accepted because it cannot change the output (NO_EFFECT: declared, then unused),
or refused by name: a field in REFUSED, any value of one declared with `off(...)` other than its
default, and any field nobody defines (extra="forbid") answer 400 naming it. Nothing is ignored.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# values that reach torch as int64 tensors (seed, top_k) must fit in one, or the engine step fails
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# Strict: JSON types as the OpenAPI document states them (no false for 0, no 1.0 for an integer;
# an integer is still a number); finite: a JSON 1e999 reads as inf; unknown fields refused
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

# fields OpenAI or vLLM define that this server does not serve, and why (answered as 400 naming the field)
REFUSED = {
    "suffix": "suffix (text insertion) is not supported",
    "prompt_logprobs": "prompt_logprobs is not supported; use echo with logprobs (completions)",
    "prompt_embeds": "prompt_embeds is not supported",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "return_token_ids": "return_token_ids is not supported",
    "logits_processors": "custom logits processors are not supported",
    "vllm_xargs": "vllm_xargs is not supported",
    "kv_transfer_params": "disaggregated prefill (kv_transfer_params) is not supported",
    "mm_processor_kwargs": "multimodal input is not supported",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported (structured output is compact JSON)",
    "chat_template": "a per-request chat_template is not supported (the model's own template is used)",
    "documents": "documents (RAG templates) are not supported",
    "functions": "functions is deprecated and not supported; use tools",
    "function_call": "function_call is deprecated and not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported",
    "verbosity": "verbosity is not supported",
    "echo": "echo is not supported for chat (it is for /v1/completions)",
}
# accepted, and without effect on what is generated
NO_EFFECT = ("user", "metadata", "store", "service_tier", "priority", "prompt_cache_key", "safety_identifier")


def off(allowed, why: str):
    """A field accepted only at the value (or one of the tuple of values) that leaves the output as it is."""
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)

    def check(value):
        if value is not None and value not in allowed:
            raise PydanticCustomError("unsupported_value", why)
        return value
    return AfterValidator(check)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # outputs follow the schema exactly either way


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of these."""
    model_config = STRICT

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Annotated[Any, off(None, "structural_tag is not supported")] = None
    disable_any_whitespace: Annotated[bool | None, off(None, "structured output is compact JSON already")] = None
    disable_additional_properties: bool | None = None  # additional properties are never generated
    whitespace_pattern: Annotated[str | None, off(None, "whitespace_pattern is not supported")] = None


class _Common(BaseModel):
    model_config = STRICT

    model: str | None = None
    adapter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = -1
    min_p: float = 0.0
    seed: Int64 | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1)
    best_of: int | None = None  # vLLM: only equal to n
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: Annotated[str | None, off(("auto", "guidance"), "the structured-output engine is "
                                                                             "llguidance (vLLM's guidance)")] = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    request_id: str | None = Field(None, max_length=128)
    use_beam_search: Annotated[bool, off(False, "beam search is not supported")] = False
    length_penalty: Annotated[float, off(1.0, "length_penalty applies to beam search, which is not supported")] = 1.0
    spaces_between_special_tokens: Annotated[bool, off(True, "special tokens are always joined with spaces")] = True
    detokenize: Annotated[bool, off(True, "outputs are always detokenized")] = True
    # no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    priority: int | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # as vLLM's: only requests with the same salt (and tenant: http.prepare.salted) share prefix-cache blocks
    cache_salt: str | None = Field(None, min_length=1, description=(
        "Applied, as in vLLM: only requests with the same salt (and, with tenant keys, the same tenant) share "
        "prefix-cache blocks, and `cached_tokens` counts only those hits."))


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
    add_special_tokens: bool = True


class ContentPart(BaseModel):
    model_config = STRICT

    type: Annotated[str, AfterValidator(lambda t: t if t == "text" else _refuse_part(t))]
    text: str


def _refuse_part(kind: str):
    raise PydanticCustomError("unsupported_value", "content parts of type {kind} are not supported: this model "
                                                   "reads text", {"kind": repr(kind)})


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments follow the parameters schema exactly either way


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


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
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    modalities: Annotated[list[str] | None, off(["text"], "only text output is supported")] = None
