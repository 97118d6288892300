"""FastAPI routes: OpenAI-style completions and chat, models, health, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError
from adapters.paths import InvalidName, PathNotAllowed

from . import openapi_doc as doc
from .adapter_api import add_adapter_routes
from .async_engine import AsyncEngine, EngineError, RequestTimeout
from .engine import AdapterExists, AdapterInUse, RequestOutput, UnknownAdapter
from .metrics import Metrics
from .openai_format import LogprobFormatter, error, merge_completion_logprobs, new_id, now, usage
from .protocol import ChatCompletionRequest, CompletionRequest
from .sampling import InvalidParam

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25

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
# what /v1/completions and /v1/chat/completions may answer besides 200 (422: an adapter on disk that fails
# to read on first use; 499: the client left before a non-streaming answer; 401/503/504: auth, backpressure
# and timeouts in front of the routes)
GENERATION_ERRORS = (400, 401, 404, 422, 499, 503, 504)


def create_app(engine: AsyncEngine, metrics: Metrics | None = None, adapter_root: str | Path | None = None) -> FastAPI:
    app = FastAPI(title="Quiver", version="0.1.0")
    doc.install(app)
    core = engine.engine
    tok = core.tokenizer
    fmt = LogprobFormatter(tok)
    metrics = metrics or engine.metrics or Metrics()
    app.state.engine = engine

    # ---- errors ----------------------------------------------------------------------------
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

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("unhandled error")
        return error(500, f"internal error: {exc}", type_="internal_error")

    add_adapter_routes(app, engine, Path(adapter_root or Path.cwd()))

    # ---- plain routes ----------------------------------------------------------------------
    @app.get("/health", responses=doc.responses(ok=doc.ok(doc.Health)))
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", responses=doc.responses(401, ok=doc.ok(doc.ModelList)))
    async def models():
        created = now()
        base = {"id": core.model_name, "object": "model", "created": created, "owned_by": "quiver",
                "root": str(core.model_dir), "parent": None, "max_model_len": core.max_model_len}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "quiver",
                     "root": core.adapter_info(name)["path"], "parent": core.model_name,
                     "max_model_len": core.max_model_len} for name in core.known_names()]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=doc.responses(401, ok=doc.ok(description="Prometheus text exposition format")))
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def adapter_of(req) -> str | None:
        if req.adapter:
            return req.adapter
        if req.model in (None, "", core.model_name):
            return None
        return req.model  # a model name that is not the base names an adapter, as in vLLM

    def check_n(req) -> None:
        if req.n != 1:
            raise InvalidParam("n", "only n=1 is supported")

    # ---- completions -----------------------------------------------------------------------
    @app.post("/v1/completions",
              responses=doc.responses(*GENERATION_ERRORS, ok=doc.ok(doc.Completion, stream=doc.CompletionChunk)))
    async def completions(req: CompletionRequest, request: Request):
        check_n(req)
        adapter = adapter_of(req)
        prompts = _prompt_ids(req.prompt, tok)
        want_prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = [req.sampling(req.max_tokens if req.max_tokens is not None else 16, req.logprobs, want_prompt_lp)
                  for _ in prompts]
        for ids, p in zip(prompts, params):
            core.check_request(ids, p, adapter)
        rid, created = new_id("cmpl"), now()
        gens = [engine.generate(ids, p, adapter) for ids, p in zip(prompts, params)]
        echo_texts = [tok.decode(ids) if req.echo else "" for ids in prompts]

        def body(choices, use=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": req.model or core.model_name,
                   "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            async def events():
                offsets = [0] * len(prompts)
                totals = [[0, 0] for _ in prompts]
                first = [True] * len(prompts)
                try:
                    async for i, out in _merge(gens):
                        text, lp = out.new_text, None
                        if first[i]:
                            first[i] = False
                            text = echo_texts[i] + text
                            if want_prompt_lp is not None:
                                lp, offsets[i] = fmt.prompt_completion(prompts[i], out.prompt_logprobs or [])
                            else:
                                offsets[i] = len(echo_texts[i])
                        if req.logprobs is not None:
                            new, offsets[i] = fmt.completion(out.new_logprobs, offsets[i])
                            lp = merge_completion_logprobs([lp, new]) if lp else new
                        totals[i] = [out.num_prompt_tokens, out.num_output_tokens]
                        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
                        yield _sse(body([choice]))
                except (EngineError, LookupError, ValueError) as exc:  # incl. an adapter that failed to load
                    yield _sse(_error_body(exc))
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(body([], usage(sum(t[0] for t in totals), sum(t[1] for t in totals))))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        results = await _collect(request, gens)
        if results is None:
            return Response(status_code=499)
        choices, n_prompt, n_out = [], 0, 0
        for i, outs in enumerate(results):
            last = outs[-1]
            text = echo_texts[i] + "".join(o.new_text for o in outs)
            lp = None
            if req.logprobs is not None:
                entries = [e for o in outs for e in o.new_logprobs]
                if want_prompt_lp is not None:
                    head, offset = fmt.prompt_completion(prompts[i], outs[0].prompt_logprobs or [])
                    lp = merge_completion_logprobs([head, fmt.completion(entries, offset)[0]])
                else:
                    lp = fmt.completion(entries, len(echo_texts[i]))[0]
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": last.finish_reason})
            n_prompt += last.num_prompt_tokens
            n_out += last.num_output_tokens
        return body(choices, usage(n_prompt, n_out))

    # ---- chat ------------------------------------------------------------------------------
    chat_ok = doc.ok(doc.ChatCompletion, stream=doc.ChatCompletionChunk)

    @app.post("/v1/chat/completions", responses=doc.responses(*GENERATION_ERRORS, ok=chat_ok))
    async def chat(req: ChatCompletionRequest, request: Request):
        check_n(req)
        adapter = adapter_of(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
        except Exception as exc:
            raise InvalidParam("messages", f"the chat template cannot render these messages: {exc}") from exc
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(core.max_model_len - len(ids), 1)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling(max_tokens, top)
        core.check_request(ids, params, adapter)
        rid, created, model = new_id("chatcmpl"), now(), req.model or core.model_name
        gen = engine.generate(ids, params, adapter)

        def chunk(delta, finish=None, lp=None, use=None, choices=True):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}] if choices else []}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            async def events():
                yield _sse(chunk({"role": "assistant", "content": ""}))
                last = None
                try:
                    async for _, out in _merge([gen]):
                        last = out
                        lp = fmt.chat(out.new_logprobs) if req.logprobs else None
                        delta = {"content": out.new_text} if out.new_text or not out.finished else {}
                        yield _sse(chunk(delta, out.finish_reason, lp))
                except (EngineError, LookupError, ValueError) as exc:  # incl. an adapter that failed to load
                    yield _sse(_error_body(exc))
                if last is not None and req.stream_options and req.stream_options.include_usage:
                    yield _sse(chunk({}, use=usage(last.num_prompt_tokens, last.num_output_tokens), choices=False))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        results = await _collect(request, [gen])
        if results is None:
            return Response(status_code=499)
        outs = results[0]
        last = outs[-1]
        lp = fmt.chat([e for o in outs for e in o.new_logprobs]) if req.logprobs else None
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(o.new_text for o in outs)},
                             "logprobs": lp, "finish_reason": last.finish_reason}],
                "usage": usage(last.num_prompt_tokens, last.num_output_tokens)}

    return app


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path`."""
    methods: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path) and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidParam("prompt", "prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON's "\ud800": the tokenizer takes only valid text
                raise InvalidParam("prompt", f"prompt is not valid Unicode text: {exc.reason} "
                                             f"at position {exc.start}") from None
        ids = tokenizer(p).input_ids if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidParam("prompt", "prompt must not be empty")
        out.append(ids)
    return out


def _error_body(exc: Exception) -> dict:
    """The error event that ends a stream whose status line has already gone out."""
    if isinstance(exc, RequestTimeout):
        return {"error": {"message": str(exc), "type": "server_error", "param": None, "code": "request_timeout"}}
    return {"error": {"message": str(exc), "type": "internal_error", "param": None, "code": None}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _merge(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs; closing this closes (and aborts) all of them."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(request: Request, gens) -> list[list[RequestOutput]] | None:
    """Run requests to completion; None (and everything aborted) if the client goes away."""
    results: list[list[RequestOutput]] = [[] for _ in gens]

    async def run():
        async for i, out in _merge(gens):
            results[i].append(out)

    task = asyncio.create_task(run())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            task.result()  # re-raises engine errors
            return results
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
