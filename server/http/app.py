"""The FastAPI application: OpenAI-style generation, adapter management, models, health, metrics.

It knows the engine only through quiver.server.engine.public (the AsyncEngine).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from quiver.server.engine.public import AsyncEngine, Metrics
from quiver.server.http import openapi as doc
from quiver.server.http.adapter_routes import add_adapter_routes
from quiver.server.http.chat import add_chat_route
from quiver.server.http.completions import add_completions_route
from quiver.server.http.errors import UnknownModel, error, install_error_handlers
from quiver.server.http.limits import BodyLimit, RequestLimits
from quiver.server.http.openai_format import now
from quiver.server.http.respond import Generation
from quiver.server.http.responses import Health, ModelCard, ModelList, json_body
from quiver.server.http.tenants import Access, access_of

log = logging.getLogger(__name__)


def create_app(engine: AsyncEngine, metrics: Metrics | None = None, adapter_root: str | Path | None = None,
               limits: RequestLimits | None = None, tool_parser: str | None = None) -> FastAPI:
    app = FastAPI(title="Quiver", version="0.1.0")
    doc.install(app)
    metrics = metrics or engine.metrics or Metrics()
    metrics.weights.labels(engine.quantization or "none").set(engine.weight_bytes)
    limits = limits or RequestLimits()
    app.state.engine = engine
    # parsing, tokenizing and checking requests happen here, so that one big request never stalls the event loop
    app.state.prep_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="quiver-prep")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    install_error_handlers(app, log)
    add_adapter_routes(app, engine, Path(adapter_root or Path.cwd()))
    generation = Generation.build(engine, limits, app.state.prep_pool, tool_parser)
    add_completions_route(app, generation)
    add_chat_route(app, generation)

    @app.get("/health", responses=doc.responses(503, ok=doc.ok(Health)))
    async def health():
        """200 while the engine makes progress; 503 (code engine_unhealthy) when its forward passes keep
        failing, or requests wait and none runs."""
        reason = engine.health()
        if reason is not None:
            return error(503, reason, type_="server_error", code="engine_unhealthy", headers={"Retry-After": "5"})
        return json_body(Health(status="ok"))

    def model_cards(access: Access) -> list[ModelCard]:
        """A card for each --served-model-name (as vLLM lists them; root: the first, which responses carry),
        then one per adapter: those `access` may use."""
        card = dict(object="model", created=now(), owned_by="quiver", max_model_len=engine.max_model_len,
                    quantization=engine.quantization, dtype=engine.dtype)
        base = engine.model_names if access.base else []
        return [*(ModelCard(id=name, root=engine.model_name, parent=None, **card) for name in base),
                *(ModelCard(id=name, root=name, parent=engine.model_name, **card)
                  for name in engine.known_adapters() if access.may_use(name))]

    @app.get("/v1/models", responses=doc.responses(401, ok=doc.ok(ModelList)))
    async def models(request: Request):
        """What the request's key may use."""
        await engine.rescan()
        return json_body(ModelList(object="list", data=model_cards(access_of(request))))

    @app.get("/v1/models/{model:path}", responses=doc.responses(401, 404, ok=doc.ok(ModelCard)))
    async def retrieve_model(model: str, request: Request):
        """The base model (by any of its names) or an adapter, as GET /v1/models lists it (for this key: what
        it may not use is a 404 as an unknown name)."""
        await engine.rescan()
        cards = {c.id: c for c in model_cards(access_of(request))}
        card = cards.get(model) or (cards.get(engine.model_name) if model in engine.base_names else None)
        if card is None:
            raise UnknownModel(model, list(cards))
        return json_body(card)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=doc.responses(401, ok=doc.ok(description="Prometheus text exposition format")))
    async def prometheus():
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE_LATEST)

    return app
