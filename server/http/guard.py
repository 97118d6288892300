"""What stands between the network and the engine: bearer-token auth, backpressure and the
shutdown drain, as one ASGI middleware in front of the routes (so it also guards streaming
responses and needs nothing from each route).

Who needs which key: adapter management (`/v1/adapters...`, vLLM's load/unload routes) the
admin key when one is set, else the API key; every other route the API key (the admin key is
accepted too), except /health and the OpenAPI docs, and /metrics with --metrics-public.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from quiver.server.engine.public import AsyncEngine
from quiver.server.http.errors import error

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIXES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass
class Guard:
    api_key: str | None = None
    admin_key: str | None = None
    metrics_public: bool = False
    max_waiting: int | None = None  # requests queued beyond this get 503 + Retry-After
    retry_after_s: int = 1

    def keys_for(self, path: str) -> tuple[str, ...]:
        """The keys any one of which opens `path`; () when it is open."""
        if path in OPEN_PATHS or (path == "/metrics" and self.metrics_public):
            return ()
        if path.startswith(ADMIN_PREFIXES):
            key = self.admin_key or self.api_key
            return (key,) if key else ()
        if not self.api_key:
            return ()
        return tuple(k for k in (self.api_key, self.admin_key) if k)


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class GuardMiddleware:
    def __init__(self, app, guard: Guard, engine: AsyncEngine):
        self.app, self.guard, self.engine = app, guard, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope):
        keys = self.guard.keys_for(scope["path"])
        if keys:
            token = _bearer(scope)
            if token is None or not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
                resp = error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        if scope["method"] != "POST" or scope["path"] not in GENERATE_PATHS:
            return None
        if self.engine.draining:
            reason, message = "shutting_down", "the server is shutting down; retry on another replica"
        elif self.guard.max_waiting is not None and self.engine.num_waiting() >= self.guard.max_waiting:
            reason, message = "overloaded", (f"{self.engine.num_waiting()} requests are already waiting "
                                             f"(--max-waiting {self.guard.max_waiting}); retry shortly")
        else:
            return None
        if self.engine.metrics is not None:
            self.engine.metrics.rejected.labels(reason).inc()
        resp = error(503, message, type_="server_error", code=reason)
        resp.headers["Retry-After"] = str(self.guard.retry_after_s)
        return resp


def install(app, engine: AsyncEngine, guard: Guard) -> None:
    """Put the guard in front of `app`'s routes (before the app starts serving)."""
    app.add_middleware(GuardMiddleware, guard=guard, engine=engine)
