"""Every error the API answers, in OpenAI's shape: one table from exception to status, field and code.

Messages reach clients without the server's file-system paths (the log keeps them): an absolute
path in a message is cut to its last component. Two answers keep theirs (PATHS_SHOWN): a path to load an
adapter from that lies outside the adapter root shows the root, the one thing that fixes it, and an
unknown model shows the client's own string and the names /v1/models lists anyway.
"""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quiver.server.engine.public import (AdapterError, AdapterExists, AdapterInUse, InvalidName, InvalidParam,
                                        PathNotAllowed, RequestFailed, RequestTimeout, UnknownAdapter, shown)
from quiver.server.http.protocol import REFUSED
from quiver.server.http.responses import ErrorDetail, ErrorResponse

LISTED = 20  # available names an unknown model's 404 lists


class UnknownModel(LookupError):
    """A request's `model` is neither a name of the base model nor an adapter: the 404 lists what is."""

    def __init__(self, name: str, available: list[str]):
        more = f" and {len(available) - LISTED} more (GET /v1/models lists them all)" if len(available) > LISTED else ""
        super().__init__(f"model {shown(name)} does not exist; available: {', '.join(available[:LISTED])}{more}")


PATHS_SHOWN = (PathNotAllowed, UnknownModel)

# exception -> (HTTP status, the request field it names, OpenAI-style code)
ERROR_STATUS = {
    UnknownModel: (404, "model", "model_not_found"),
    UnknownAdapter: (404, "adapter", "model_not_found"),
    InvalidName: (400, "name", "invalid_adapter_name"),
    PathNotAllowed: (400, "path", "path_not_allowed"),
    FileNotFoundError: (404, "path", "adapter_path_not_found"),
    AdapterError: (422, "path", "invalid_adapter"),
    AdapterExists: (409, "name", "adapter_exists"),
    AdapterInUse: (409, "name", "adapter_in_use"),
}


_PATH = re.compile(r"(?<![\w.~/:-])/(?:[^\s/'\"]+/)+([^\s/'\":,)]*)")


def public(message: str) -> str:
    """`message` without absolute paths: '/srv/adapters/sql/adapter_config.json: ...' -> 'adapter_config.json: ...'."""
    return _PATH.sub(lambda m: m.group(1) or "<path>", message)


def body(message: str, type_: str, param: str | None, code: str | None, paths: bool = False) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message if paths else public(message), type=type_, param=param,
                                           code=code))


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None, paths: bool = False) -> JSONResponse:
    """An OpenAI-shaped error; `paths`: keep absolute paths in the message (see the module's docstring)."""
    return JSONResponse(body(message, type_, param, code, paths).model_dump(), status_code=status, headers=headers)


def stream_error(exc: Exception) -> ErrorResponse:
    """The error event that ends a stream whose status line has already gone out."""
    if isinstance(exc, RequestTimeout):
        type_, code = "server_error", "request_timeout"
    elif isinstance(exc, RequestFailed):
        type_, code = "server_error", exc.code
    else:
        spec = next((v for k, v in ERROR_STATUS.items() if isinstance(exc, k)), None)
        type_, code = ("invalid_request_error", spec[2]) if spec else ("internal_error", None)
    return body(str(exc), type_, None, code)


def install_error_handlers(app: FastAPI, log) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"request body is not valid JSON: {first.get('msg', '')}", param=None,
                         code="json_invalid")
        param = loc[0] if loc else None
        message = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":  # a field this server does not serve, named
            message = REFUSED.get(loc[-1], "not a request field of this API") if loc else message
        return error(400, f"{'.'.join(loc) or 'body'}: {message}", param=param)

    @app.exception_handler(InvalidParam)
    async def _bad_param(_, exc: InvalidParam):
        return error(400, str(exc), param=exc.param)

    def status_handler(status: int, param: str, code: str):
        async def handle(_, exc: Exception):
            return error(status, str(exc), param=param, code=code, paths=isinstance(exc, PATHS_SHOWN))
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

    @app.exception_handler(RequestFailed)
    async def _failed(_, exc: RequestFailed):
        return error(exc.status, str(exc), type_="server_error", code=exc.code)

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
