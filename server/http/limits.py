"""Bounds on what one request may ask of the server, each answered with a 4xx that names the field.

The body size is enforced by a middleware before anything parses it (413); the rest when the
request is prepared, off the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from quiver.server.engine.public import InvalidParam, SamplingParams
from quiver.server.http.errors import error


@dataclass
class RequestLimits:
    max_body_bytes: int = 8 << 20  # a request body (413 beyond)
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_stop: int = 64  # stop strings
    max_stop_chars: int = 1024  # characters of one stop string
    max_stop_token_ids: int = 1024
    max_name_chars: int = 256  # the `model` and `adapter` fields
    max_bad_words: int = 1024  # bad_words entries; their tokens (both spellings) at most 16 per entry in all
    max_grammar_chars: int = 64 << 10  # a schema, regex or grammar's text (compiling is superlinear in it)
    prefix_cache_scope: str = "tenant"  # whose requests may share cached K/V (prepare.salted)

    def check_names(self, req) -> None:
        for field in ("model", "adapter"):
            value = getattr(req, field, None)
            if value is not None and len(value) > self.max_name_chars:
                raise InvalidParam(field, f"{field} is {len(value)} characters long; at most {self.max_name_chars}")

    def check_prompts(self, count: int, param: str = "prompt") -> None:
        """count: sequences one request asks for (prompts x n)."""
        if count > self.max_prompts:
            raise InvalidParam(param, f"{count} sequences (prompts x n) in one request; at most {self.max_prompts}")

    def check_sampling(self, params: SamplingParams) -> None:
        if len(params.stop) > self.max_stop:
            raise InvalidParam("stop", f"{len(params.stop)} stop strings; at most {self.max_stop}")
        if any(len(s) > self.max_stop_chars for s in params.stop):
            raise InvalidParam("stop", f"a stop string is longer than {self.max_stop_chars} characters")
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise InvalidParam("stop_token_ids", f"{len(params.stop_token_ids)} stop_token_ids; at most "
                                                 f"{self.max_stop_token_ids}")


    def check_bad_words(self, words: list[str]) -> None:
        """Before tokenizing: the count."""
        if len(words) > self.max_bad_words:
            raise InvalidParam("bad_words", f"{len(words)} bad_words; at most {self.max_bad_words}")

    def check_bad_word_tokens(self, total: int) -> None:
        if total > 16 * self.max_bad_words:
            raise InvalidParam("bad_words", f"bad_words come to {total} tokens; at most {16 * self.max_bad_words}")

    @staticmethod
    def check_allowed_token_ids(ids: list[int] | None, vocab_size: int) -> list[int] | None:
        """allowed_token_ids as a sorted set, checked once per request (not per choice or step)."""
        if ids is None:
            return None
        if len(ids) > vocab_size:
            raise InvalidParam("allowed_token_ids", f"{len(ids)} allowed_token_ids; at most the vocabulary, "
                                                    f"{vocab_size}")
        return sorted(set(ids))


# chat_template_kwargs keys that would replace the template, add what a request may not send, or override
# what the server passes itself (apply_chat_template's own arguments)
TEMPLATE_RESERVED = frozenset({"chat_template", "documents", "tools", "messages", "conversation",
                               "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                               "truncation", "max_length", "return_tensors", "return_dict",
                               "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})


def template_kwargs(kwargs: dict, template) -> dict:
    """The chat_template_kwargs the model's template reads (vLLM drops the others, as here), each a plain
    JSON value: a reserved key is a 400, so no request brings its own template or anything it can call."""
    for key, value in kwargs.items():
        if key in TEMPLATE_RESERVED:
            raise InvalidParam("chat_template_kwargs", f"chat_template_kwargs.{key[:40]} is not allowed: a request "
                                                       f"may set only the variables the model's template reads")
        if not _plain(value):
            raise InvalidParam("chat_template_kwargs", f"chat_template_kwargs.{key[:40]} must be plain JSON")
    read = _template_variables(template if isinstance(template, str) else None)
    return {k: v for k, v in kwargs.items() if read is None or k in read}


def _plain(value, depth: int = 0) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if depth > 32:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())


@lru_cache(maxsize=8)
def _template_variables(template: str | None) -> frozenset[str] | None:
    """The names a template reads from its context; None when it cannot be parsed here (all pass then)."""
    if template is None:
        return None
    import jinja2
    import jinja2.meta

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)))
    except jinja2.TemplateError:
        return None


class BodyLimit:
    """ASGI middleware: a request body is read here, up to the limit, before any route sees it; a larger
    one (by Content-Length, or as it streams in) gets 413 and is never buffered further."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect detection, after the body
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        await error(413, f"the request body exceeds {self.max_bytes} bytes (--max-request-bytes)", param=None,
                    code="request_too_large")(scope, receive, send)
