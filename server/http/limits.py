"""Bounds on what one request may ask of the server, each answered with a 4xx that names the field.

The body size is enforced by a middleware before anything parses it (413); the rest when the
request is prepared, off the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass

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
