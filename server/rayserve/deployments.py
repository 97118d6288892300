"""The two Ray Serve deployments: QuiverEngine replicas, and the OpenAI ingress in front of them.

Each QuiverEngine replica is one `quiver serve` (engine and HTTP app, built from the same flags) on
one device. The ingress reads which adapter a generation request names and calls a replica through
Serve's model multiplexing, so an adapter's requests go to the replicas that already hold it; a
replica still takes up to its batch capacity of concurrent requests, whatever their adapters, and
Quiver's own scheduler puts them in the same steps. Quiver's registry owns adapter residency: the
multiplexed "model" Serve tracks is only a lease that tells its router where an adapter is warm.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from quiver.server.assemble import build_server
from quiver.server.http.errors import error
from quiver.server.http.guard import GENERATE_PATHS, Guard, bearer
from quiver.server.http.responses import ErrorDetail, ErrorResponse, sse
from quiver.server.rayserve.asgi_call import Head, HttpCall, call_asgi
from quiver.server.rayserve.catalog import Catalog, adapter_change, apply

# a replica's process is gone (killed, out of memory, its node lost): the call can go to another one
REPLICA_LOST = (RayActorError, ActorUnavailableError)
NOT_FORWARDED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
REPLICA_HEADER = b"x-quiver-replica"


class AdapterLease:
    """What Serve's multiplexing LRU holds for an adapter on a replica: nothing to free when it drops it
    (the registry decides what stays in memory); it only steers the router."""

    def __init__(self, adapter: str):
        self.adapter = adapter


def may_hold(guard: Guard, call: HttpCall, adapter: str) -> bool:
    """Whether `call`'s key may use `adapter`: only then does a replica look the name up on disk and take
    a lease on it, so that a request without a key, or out of its key's scope, costs nothing and steers
    nothing before the replica's guard answers it."""
    access = guard.access(call.path, bearer(call.headers))
    return access is not None and access.may_use(adapter)


@serve.deployment(name="QuiverEngine")
class QuiverEngine:
    def __init__(self, args, max_adapters: int):
        self.engine, self.app = build_server(args)
        self.engine.start()
        self.adapter_root = Path(args.adapter_root or args.adapter_dir or Path.cwd()).resolve()  # as create_app's
        self.catalog_version = 0  # of the API loads and unloads applied here
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.stamp = [(REPLICA_HEADER, f"{self.replica} {os.getpid()}".encode())]

        async def lease(adapter: str) -> AdapterLease:
            return AdapterLease(adapter)

        self.lease = serve.multiplexed(max_num_models_per_replica=max_adapters)(lease)

    async def handle(self, call: HttpCall, catalog: Catalog):
        """The single server's answer to `call`: its Head (stamped with this replica), then body chunks;
        first the API's adapter loads and unloads this replica has not applied yet."""
        if catalog.version > self.catalog_version:
            changes, root = catalog.changes, self.adapter_root
            if await self.engine.call(lambda engine: apply(engine, changes, root)):
                self.catalog_version = max(self.catalog_version, catalog.version)
        adapter = serve.get_multiplexed_model_id()
        if adapter and may_hold(self.app.state.guard, call, adapter):
            await self._hold(adapter)
        async for item in call_asgi(self.app, call):
            if isinstance(item, Head):
                item.headers += self.stamp
            yield item

    async def _hold(self, adapter: str) -> None:
        """Tell Serve this replica holds `adapter` (a known one: a misspelt name gets its 404, not a lease)."""
        await asyncio.to_thread(self.engine.discover, adapter)
        if adapter in self.engine.known_adapters():
            await self.lease(adapter)

    def base_names(self) -> frozenset[str]:
        """Every name a request may give the base model (its served names and its path)."""
        return self.engine.base_names

    def replica_info(self) -> dict:
        """Who this replica is, its adapters and its engine's /metrics text (tests and operators, through a
        handle)."""
        return {"replica": self.replica, "pid": os.getpid(), "adapters": self.engine.known_adapters(),
                "metrics": self.engine.metrics.render().decode()}

    def check_health(self) -> None:
        """Serve restarts a replica whose engine no longer makes progress (as /health would answer 503)."""
        reason = self.engine.health()
        if reason is not None:
            raise RuntimeError(reason)

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.stop()


@serve.deployment(name="OpenAIIngress")
class OpenAIIngress:
    """Forwards every request to a replica's app. A request whose replica is lost before anything of
    its answer was sent is retried once on another replica; a stream already under way ends with an
    error event. Adapter loads and unloads through the API reach every replica (catalog.py), so the
    deployment keeps one ingress replica: the catalog is its state."""

    def __init__(self, engine):
        self.engine = engine
        self.base_names: frozenset[str] | None = None
        self.catalog = Catalog()
        self.draining = False
        self.running = 0  # requests under way here, a stream until its last chunk

    async def drain(self, grace: float) -> None:
        """`quiver ray serve` is stopping: refuse every new request (503) and wait up to `grace` seconds for
        the ones under way, while the route still reaches this ingress (deleting the app would turn new
        requests into the proxy's 404s)."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def __call__(self, request: Request) -> Response:
        if self.draining:
            return error(503, "the server is shutting down; retry on another replica", type_="server_error",
                         code="shutting_down", headers={"Retry-After": "1"})
        self.running += 1
        streaming = False
        try:
            response = await self._forward(request)
            streaming = isinstance(response, StreamingResponse)  # it counts itself out after its last chunk
            return response
        finally:
            if not streaming:
                self._ended()

    def _ended(self) -> None:
        self.running -= 1

    async def _forward(self, request: Request) -> Response:
        call = HttpCall(request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                        await request.body())
        change = adapter_change(call)  # a load or unload goes to a replica holding the adapter, if one does
        adapter = change[0] if change else await self._adapter(call)
        handle = self.engine.options(multiplexed_model_id=adapter, stream=True)
        for attempt in (1, 2):
            stream = handle.handle.remote(call, self.catalog.snapshot())
            try:
                head = await stream.__anext__()
                if _is_stream(head):
                    first = await anext(stream, b"")
                    return _streaming(head, first, stream, self._ended)
                body = b"".join([chunk async for chunk in stream])
                if change and 200 <= head.status < 300:
                    self.catalog.record(*change)
                return _response(head, body)
            except REPLICA_LOST as exc:
                stream.cancel()
                if attempt == 2:
                    return _replica_lost(exc)
            except RayServeException as exc:  # no replica can take it now (starting, back-pressure)
                return error(503, f"no replica can take the request now: {exc}", type_="server_error",
                             code="unavailable", headers={"Retry-After": "1"})

    async def _adapter(self, call: HttpCall) -> str:
        """The adapter a generation request names (`adapter`, else `model` when it is not the base
        model): Serve's multiplexed model id, "" for the base model and everything else."""
        if call.method != "POST" or call.path not in GENERATE_PATHS:
            return ""
        try:
            body = json.loads(call.body)
        except ValueError:
            return ""  # the replica answers the 400
        if not isinstance(body, dict):
            return ""
        name = body.get("adapter") or body.get("model")
        if not isinstance(name, str):
            return ""
        if self.base_names is None:
            self.base_names = await self.engine.base_names.remote()
        return "" if name in self.base_names else name


def _is_stream(head: Head) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in head.headers)


def _forwarded(head: Head) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in head.headers if k not in NOT_FORWARDED]


def _response(head: Head, body: bytes) -> Response:
    response = Response(body, status_code=head.status)
    response.raw_headers = _forwarded(head) + [(b"content-length", str(len(body)).encode())]
    return response


def _streaming(head: Head, first: bytes, stream, ended) -> StreamingResponse:
    async def relay():
        try:
            yield first
            async for chunk in stream:
                yield chunk
        except REPLICA_LOST as exc:
            lost = ErrorDetail(message=f"the replica serving this stream was lost ({type(exc).__name__}); the output "
                                       "so far is all there is", type="server_error", param=None, code="replica_lost")
            yield (sse(ErrorResponse(error=lost)) + "data: [DONE]\n\n").encode()
        finally:
            stream.cancel()  # a client that left: the replica aborts its engine requests
            ended()

    response = StreamingResponse(relay(), status_code=head.status)
    response.raw_headers = _forwarded(head)
    return response


def _replica_lost(exc: Exception) -> Response:
    return error(503, f"the replica serving this request was lost twice ({type(exc).__name__}); retry",
                 type_="server_error", code="replica_lost", headers={"Retry-After": "1"})
