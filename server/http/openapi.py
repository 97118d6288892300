"""The OpenAPI document, kept truthful: every status a route can answer, with the body it sends.

Routes name their statuses with `responses(...)` and their bodies with `ok(...)`, the models of
responses.py that they build their bodies from; `install(app)` makes the final document (FastAPI's
own 422 HTTPValidationError goes: request validation answers 400 with the OpenAI error body) and
adds the optional bearer-token scheme.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from quiver.server.http.responses import ErrorResponse

# bodies the document names by $ref only (error bodies, and the stream chunks ok() names), added to its
# components by build()
REFERENCED: list[type[BaseModel]] = [ErrorResponse]

_ERROR_TEXT = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, an unsupported value.",
    401: "Missing or wrong bearer token (only when the server is started with an API key).",
    404: "Unknown model or adapter, or an adapter folder that does not exist.",
    409: "The adapter name is already known (loaded, or on disk), or the adapter is in use by requests.",
    413: "The request body is larger than the server accepts (--max-request-bytes).",
    422: "The adapter folder cannot be read as an adapter for this model (or failed to load on first use).",
    500: "The model failed on this request alone (the others go on), e.g. non-finite logits.",
    503: "Overloaded, shutting down, or the engine is unhealthy; retry after `Retry-After` seconds.",
    504: "The request ran past the server's request timeout.",
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _error(status: int) -> dict:
    # content spelled out (not `model`): routes whose 200 is text/plain still answer errors in JSON
    out: dict[str, Any] = {"description": _ERROR_TEXT[status], "content": copy.deepcopy(_ERROR_CONTENT)}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"description": "`Bearer`", "required": True,
                                               "schema": {"type": "string"}}}
    if status == 503:
        out["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                                          "schema": {"type": "integer", "minimum": 0}}}
    return out


CLIENT_GONE = {499: {"description": "The client disconnected before the (non-streaming) answer was ready; "
                                    "no body is sent."}}


def responses(*statuses: int, ok: dict | None = None) -> dict[int | str, dict]:
    """A route's `responses=`: the named error statuses with the error body, plus `ok` for 200."""
    out: dict[int | str, dict] = {}
    if ok is not None:
        out[200] = ok
    for status in statuses:
        out.update(CLIENT_GONE if status == 499 else {status: _error(status)})
    return out


def _sse_event(chunk: str) -> dict:
    """One server-sent event (OpenAPI before 3.2: a text/event-stream `schema` describes each event)."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                                             {"$ref": "#/components/schemas/ErrorResponse"}]}}
    return {"type": "object", "required": ["data"],
            "description": f"`data: <{chunk} JSON>` events, then `data: [DONE]`; an error after the stream "
                           "has begun arrives as one error-body event before [DONE].",
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def ok(model: type[BaseModel] | None = None, *, stream: type[BaseModel] | None = None, text: bool = False,
       description: str = "Successful response") -> dict:
    """A 200 declaration: JSON of `model`, plus server-sent `stream` chunks when the request may stream."""
    out: dict[str, Any] = {"description": description}
    if model is not None:
        out["model"] = model
    if stream is not None:
        if stream not in REFERENCED:
            REFERENCED.append(stream)
        out["content"] = {"text/event-stream": {"schema": _sse_event(stream.__name__)}}
    if text:
        out["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return out


REQUESTS: list[type[BaseModel]] = []  # request bodies the routes parse themselves (off the event loop)


def request_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra` for a JSON body of `model` that the route parses itself."""
    REQUESTS.append(model)
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


# ---- the document ----------------------------------------------------------------------------

_FASTAPI_422 = "#/components/schemas/HTTPValidationError"
_AUTH = "bearerAuth"


def _needs_auth(path: str) -> bool:
    return path.startswith("/v1/") or path == "/metrics"


def build(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      description=app.description, routes=app.routes, tags=app.openapi_tags, servers=app.servers,
                      separate_input_output_schemas=app.separate_input_output_schemas)
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            resp = op.get("responses", {})
            schema = resp.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == _FASTAPI_422:  # FastAPI's default; this app answers 400 instead
                del resp["422"]
            if _needs_auth(path):
                # optional: the token is checked only when the server is started with one
                op["security"] = [{_AUTH: []}, {}]
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in REFERENCED] + [(m, "validation") for m in REQUESTS],
                                 ref_template="#/components/schemas/{model}")
    for name, schema in defs["$defs"].items():
        schemas.setdefault(name, schema)
    components.setdefault("securitySchemes", {})[_AUTH] = {
        "type": "http", "scheme": "bearer",
        "description": "Required only when the server is started with an API key."}
    return doc


def install(app: FastAPI) -> None:
    """Replace app.openapi with the truthful document (built once, on first request)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]
