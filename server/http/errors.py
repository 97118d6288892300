"""Every error the API answers, in OpenAI's shape: one table from exception to status, field and code."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quiver.adapters.errors import AdapterError
from quiver.adapters.paths import InvalidName, PathNotAllowed
from quiver.server.engine.async_engine import RequestTimeout
from quiver.server.engine.sampling import InvalidParam
from quiver.server.families.registry import AdapterExists, AdapterInUse, UnknownAdapter

# exception -> (HTTP status, the request field it names, OpenAI-style code)
ERROR_STATUS = {
    UnknownAdapter: (404, "adapter", "model_not_found"),
    InvalidName: (400, "name", "invalid_adapter_name"),
    PathNotAllowed: (400, "path", "path_not_allowed"),
    FileNotFoundError: (404, "path", "adapter_path_not_found"),
    AdapterError: (422, "path", "invalid_adapter"),
    AdapterExists: (409, "name", "adapter_exists"),
    AdapterInUse: (409, "name", "adapter_in_use"),
}


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def stream_error(exc: Exception) -> dict:
    """The error event that ends a stream whose status line has already gone out."""
    if isinstance(exc, RequestTimeout):
        return {"error": {"message": str(exc), "type": "server_error", "param": None, "code": "request_timeout"}}
    return {"error": {"message": str(exc), "type": "internal_error", "param": None, "code": None}}


def install_error_handlers(app: FastAPI, log) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"request body is not valid JSON: {first.get('msg', '')}", param=None, code="json_invalid")
        param = loc[0] if loc else None
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(InvalidParam)
    async def _bad_param(_, exc: InvalidParam):
        return error(400, str(exc), param=exc.param)

    def status_handler(status: int, param: str, code: str):
        async def handle(_, exc: Exception):
            return error(status, str(exc), param=param, code=code)
        return handle

    for exc_type, spec in ERROR_STATUS.items():
        app.add_exception_handler(exc_type, status_handler(*spec))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names only the first route on the path
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.url.path))}
        return error(exc.status_code, str(exc.detail), type_="invalid_request_error", headers=headers)

    @app.exception_handler(RequestTimeout)
    async def _timeout(_, exc: RequestTimeout):
        return error(504, str(exc), type_="server_error", code="request_timeout")

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("unhandled error")
        return error(500, f"internal error: {exc}", type_="internal_error")


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path`."""
    methods: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path) and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)
