"""The FastAPI application: OpenAI-style generation, adapter management, models, health, metrics.

It knows the engine only through quiver.server.engine.async_engine.AsyncEngine.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.http import openapi as doc
from quiver.server.http.adapter_routes import add_adapter_routes
from quiver.server.http.errors import install_error_handlers
from quiver.server.http.generate import add_generate_routes
from quiver.server.http.openai_format import now

log = logging.getLogger(__name__)


def create_app(engine: AsyncEngine, metrics: Metrics | None = None, adapter_root: str | Path | None = None) -> FastAPI:
    app = FastAPI(title="Quiver", version="0.1.0")
    doc.install(app)
    metrics = metrics or engine.metrics or Metrics()
    app.state.engine = engine
    install_error_handlers(app, log)
    add_adapter_routes(app, engine, Path(adapter_root or Path.cwd()))
    add_generate_routes(app, engine)

    @app.get("/health", responses=doc.responses(ok=doc.ok(doc.Health)))
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", responses=doc.responses(401, ok=doc.ok(doc.ModelList)))
    async def models():
        created = now()
        base = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "quiver",
                "root": str(engine.model_dir), "parent": None, "max_model_len": engine.max_model_len}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "quiver", "root": path,
                     "parent": engine.model_name, "max_model_len": engine.max_model_len}
                    for name, path in engine.known_adapters().items()]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=doc.responses(401, ok=doc.ok(description="Prometheus text exposition format")))
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
