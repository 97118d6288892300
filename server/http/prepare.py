"""A parsed request turned into engine work: token ids, one SamplingParams per choice, its grammar.

Runs on the HTTP preparation pool, off the event loop and off the engine thread: tokenizing, the chat
template and compiling a grammar all happen here, and every check the engine would make is made
before a response starts, so a bad request is a 400 naming its field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

from quiver.server.engine.public import InvalidParam, PreparedRequest, SamplingParams, UnknownAdapter
from quiver.server.http.errors import UnknownModel
from quiver.server.http.limits import RequestLimits, template_kwargs
from quiver.server.http.structured import grammar_spec
from quiver.server.http.tenants import OPEN, Access
from quiver.server.http.tools import ToolPlan, plan_tools


PREFIX_CACHE_SCOPES = ("tenant", "global")  # --prefix-cache-scope


def salted(tenant: str | None, client_salt: str | None, scope: str = "tenant") -> str | None:
    """What a request's prefix-cache blocks are salted with (PreparedRequest.cache_salt): its cache_salt
    and, under scope "tenant", its tenant, so that it shares cached K/V (and cached_tokens counts hits)
    only with requests of the same tenant and cache_salt; under "global" (an operator's shared prefixes)
    the cache_salt alone. None (no salt: shared with every unsalted request) when neither is given. No
    client's cache_salt spells another tenant's salt."""
    tenant = tenant if scope == "tenant" else None
    return None if tenant is None and client_salt is None else json.dumps([tenant, client_salt])


@dataclass
class Job:
    adapter: str | None
    prompts: list[list[int]]
    requests: list[list[PreparedRequest]]  # [prompt][choice], each checked by the engine
    echo: list[str]  # text put before each prompt's choices (completions' echo)
    prompt_logprobs: int | None = None  # completions' echo with logprobs
    tools: ToolPlan | None = None
    deadline: float | None = None  # the event loop's time by which it must finish (--request-timeout)

    @property
    def choices(self) -> int:
        """Engine requests in all: prompts x n."""
        return sum(len(c) for c in self.requests)


class Preparer:
    def __init__(self, engine, limits: RequestLimits, tool_parser: str | None = None):
        self.engine, self.tok, self.limits = engine, engine.tokenizer, limits
        self.tool_parser = tool_parser

    def adapter_of(self, req, access: Access = OPEN) -> str | None:
        """The adapter a request names, in `adapter` or (as in vLLM) in `model`, where any name of the base
        model (engine.base_names: its served names and its path) means none; both must agree. A `model` that
        names neither is UnknownModel (param model); an unknown `adapter` stays UnknownAdapter. What `access`
        may not use is answered exactly as an unknown name, its 404 listing only what `access` may use."""
        in_model = None if not req.model or req.model in self.engine.base_names else req.model
        if req.adapter and in_model and req.adapter != in_model:
            raise InvalidParam("adapter", f"adapter {req.adapter!r} and model {in_model!r} name different adapters")
        adapter = req.adapter or in_model
        if not access.may_use(adapter):
            if req.adapter:
                raise UnknownAdapter(req.adapter)
            raise UnknownModel(req.model or "", self.available(access))
        self.engine.discover(adapter)
        if in_model and not req.adapter and not self.engine.knows(in_model):
            raise UnknownModel(in_model, self.available(access))
        return adapter

    def available(self, access: Access) -> list[str]:
        """What an unknown model's 404 lists: the names `access` may use."""
        return access.visible(self.engine.model_names, self.engine.known_adapters())

    def adapter_and_choices(self, req, access: Access) -> str | None:
        """The adapter; and n as vLLM's V1 engine takes it (no best_of beyond n)."""
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidParam("best_of", "best_of other than n is not supported (as in vLLM's V1 engine)")
        return self.adapter_of(req, access)

    def completion(self, req, access: Access = OPEN) -> Job:
        """access: what the request's key may use; access.tenant is its tenant (str | None), which salts its
        prefix-cache blocks (salted)."""
        adapter = self.adapter_and_choices(req, access)
        prompts = self._prompt_ids(req)
        self.limits.check_prompts(len(prompts) * req.n, "n" if req.n > 1 else "prompt")
        want_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        grammar, salt = self._grammar(req), salted(access.tenant, req.cache_salt, self.limits.prefix_cache_scope)
        requests = [[self._request(ids, p, adapter, salt) for p in self._choices(req, max_tokens, req.logprobs,
                                                                                  want_lp, grammar)]
                    for ids in prompts]
        echo = [self.tok.decode(ids) if req.echo else "" for ids in prompts]
        return Job(adapter, prompts, requests, echo, want_lp)

    def chat(self, req, access: Access = OPEN) -> Job:
        adapter = self.adapter_and_choices(req, access)
        self.limits.check_prompts(req.n, "n")
        tools = plan_tools(req, self.tool_parser)
        ids = self._render(req, tools)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # what the context leaves, the adapter's virtual tokens included
            max_tokens = max(self.engine.max_model_len - len(ids) - self.engine.virtual_tokens(adapter), 1)
        choices = self._choices(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, None,
                                self._grammar(req, tools.grammar if tools else None))
        salt = salted(access.tenant, req.cache_salt, self.limits.prefix_cache_scope)
        return Job(adapter, [ids], [[self._request(ids, p, adapter, salt) for p in choices]], [""], None, tools)

    # ---- pieces ----------------------------------------------------------------------------
    def _request(self, ids: list[int], params: SamplingParams, adapter: str | None, salt: str | None):
        return replace(self.engine.prepare(ids, params, adapter), cache_salt=salt)

    def _grammar(self, req, tool_grammar=None):
        spec = grammar_spec(req, tool_grammar, self.limits.max_grammar_chars)
        return self.engine.compile_grammar(spec) if spec is not None else None

    def _choices(self, req, max_tokens: int, logprobs, prompt_logprobs, grammar) -> list[SamplingParams]:
        """One SamplingParams per choice; choice j of a seeded request draws with seed + j, as in vLLM (wrapped
        within int64: the draws use its low 32 bits, which wrapping keeps)."""
        allowed = self.limits.check_allowed_token_ids(req.allowed_token_ids, len(self.tok))  # once, for all choices
        computed = dict(max_tokens=max_tokens, stop=req.stop or [], logit_bias=_logit_bias(req.logit_bias),
                        bad_words_ids=self._bad_words(req.bad_words or []), logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs, grammar=grammar, allowed_token_ids=allowed)
        out = [SamplingParams.from_request(req, **computed, seed=None if req.seed is None else (req.seed + j) % 2**63)
               for j in range(req.n)]
        self.limits.check_sampling(out[0])
        return out

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        """Each word's tokens as written and with a leading space (vLLM's two spellings), each sequence once."""
        self.limits.check_bad_words(words)
        seen: dict[tuple[int, ...], None] = {}
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tok.encode(text, add_special_tokens=False)
                if ids:
                    seen[tuple(ids)] = None
        self.limits.check_bad_word_tokens(sum(map(len, seen)))
        return [list(ids) for ids in seen]

    def _prompt_ids(self, req) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise InvalidParam("prompt", "prompt must not be empty")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        self.limits.check_prompts(len(prompt))
        out = []
        for p in prompt:
            if isinstance(p, str):
                _check_text(p, "prompt")
            ids = self.tok(p, add_special_tokens=req.add_special_tokens).input_ids if isinstance(p, str) else list(p)
            if not ids:
                raise InvalidParam("prompt", "prompt must not be empty")
            out.append(_truncate(ids, req.truncate_prompt_tokens))
        return out

    def _render(self, req, tools: ToolPlan | None) -> list[int]:
        messages = [_template_message(m) for m in req.messages]
        kwargs = template_kwargs(req.chat_template_kwargs or {}, getattr(self.tok, "chat_template", None))
        if tools is not None:
            kwargs["tools"] = tools.tools
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt and not
                                                req.continue_final_message,
                                                continue_final_message=req.continue_final_message, tokenize=False,
                                                **kwargs)
        except Exception as exc:
            raise InvalidParam("messages", f"the chat template cannot render these messages: {exc}") from exc
        if len(text) > 2 * self.limits.max_body_bytes:
            raise InvalidParam("messages", f"the chat template renders these messages as {len(text)} characters; at "
                                           f"most {2 * self.limits.max_body_bytes}")
        ids = self.tok(text, add_special_tokens=req.add_special_tokens).input_ids
        return _truncate(ids, req.truncate_prompt_tokens)


def _template_message(m) -> dict:
    out = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:  # templates index into the arguments, so they get them as objects
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                                       "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise InvalidParam("messages", "a tool call's function.arguments is not valid JSON") from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidParam("logit_bias", f"logit_bias keys are token ids; {key[:20]!r} is not one") from None
    return out


def _truncate(ids: list[int], keep: int | None) -> list[int]:
    return ids[-keep:] if keep is not None else ids


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800": the tokenizer takes only valid text
        raise InvalidParam(param, f"{param} is not valid Unicode text: {exc.reason} at position {exc.start}") from None
