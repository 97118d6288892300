"""What stands between the network and the engine: bearer-token auth, backpressure and the
shutdown drain, as one ASGI middleware in front of the routes (so it also guards streaming
responses and needs nothing from each route).

Who needs which key: adapter management (`/v1/adapters...`, vLLM's load/unload routes) an admin key
(--admin-key, a keys file's admin entries, and --api-key when no --admin-key is set); every other route
any key, except /health and the OpenAPI docs, and /metrics with --metrics-public (a tenant's key reads
/metrics only when it is an admin). Without any key every route is open; with only --admin-key, only
adapter management is guarded. Paths are matched as the router matches them: relative to the root path,
so that a mount or --root-path cannot move a route out of its guard.

The key's Access (tenants.py) goes on the request's state as `access`, and its tenant's name (str | None)
as `tenant`, for the routes and request preparation to read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from starlette._utils import get_route_path  # what the router matches: scope["path"] less the root path

from quiver.server.engine.public import AsyncEngine
from quiver.server.http.errors import error
from quiver.server.http.tenants import OPEN, Access, Keys, digest

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
    tenants: list[tuple[str, Access]] = field(default_factory=list)  # --api-keys-file's (digest, Access)

    def __post_init__(self):
        legacy = [(digest(k), Access(admin=admin)) for k, admin in ((self.api_key, self.admin_key is None),
                                                                    (self.admin_key, True)) if k]
        self.keys = Keys(legacy + self.tenants)
        self.user_keys = bool(self.api_key or self.tenants)  # else only adapter management is guarded

    def access(self, path: str, token: str | None) -> Access | None:
        """What `token` opens on `path` (a route path); None: refused (401)."""
        admin = path.startswith(ADMIN_PREFIXES)
        if path in OPEN_PATHS or (path == "/metrics" and self.metrics_public) or not self.keys.entries or (
                not admin and not self.user_keys):
            return OPEN
        found = self.keys.lookup(token) if token is not None else None
        if found is None or (admin and not found.admin) or (path == "/metrics" and not found.metrics):
            return None
        return found


def bearer(headers) -> str | None:
    """The bearer token in raw ASGI headers [(name, value)], None without one."""
    for name, value in headers:
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
        path = get_route_path(scope)
        access = self.guard.access(path, bearer(scope.get("headers", ())))
        if access is None:
            needs = "an admin key" if path.startswith(ADMIN_PREFIXES) else "a key"
            resp = error(401, f"missing or wrong API key: this route needs {needs}: send 'Authorization: Bearer "
                              "<key>'", code="invalid_api_key")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        state = scope.setdefault("state", {})
        state["access"], state["tenant"] = access, access.tenant
        if scope["method"] != "POST" or path not in GENERATE_PATHS:
            return None
        if self.engine.draining:
            reason, message = "shutting_down", "the server is shutting down; retry on another replica"
        elif self.guard.max_waiting is not None and self.engine.num_waiting() >= self.guard.max_waiting:
            reason, message = "overloaded", (f"{self.engine.num_waiting()} requests are already waiting "
                                             f"(--max-waiting {self.guard.max_waiting}); retry shortly")
        else:
            if access.tenant is not None and self.engine.metrics is not None:
                self.engine.metrics.tenant_requests.labels(access.tenant).inc()
            return None
        if self.engine.metrics is not None:
            self.engine.metrics.rejected.labels(reason).inc()
        resp = error(503, message, type_="server_error", code=reason)
        resp.headers["Retry-After"] = str(self.guard.retry_after_s)
        return resp


def install(app, engine: AsyncEngine, guard: Guard) -> None:
    """Put the guard in front of `app`'s routes (before the app starts serving)."""
    if engine.metrics is not None:  # each tenant's series from the start, at 0
        for tenant in guard.keys.tenants():
            engine.metrics.tenant_requests.labels(tenant)
    app.state.guard = guard  # the Ray replica asks it before it holds an adapter for a request
    app.add_middleware(GuardMiddleware, guard=guard, engine=engine)
