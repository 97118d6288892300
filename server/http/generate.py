"""The generation routes: /v1/completions and /v1/chat/completions, n choices, streaming or not.

Each choice is one engine request; choice j of a prompt shares the prompt's KV blocks with choice 0
(LLMEngine.add_request's fork_of). Choices are numbered prompt-major (prompt i, choice j: i * n + j),
usage counts each prompt once and every choice's tokens, and `model` names the adapter that ran.
"""
from __future__ import annotations

import itertools

import asyncio
import json
import uuid
from concurrent.futures import Executor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from quiver.server.engine.public import AsyncEngine
from quiver.server.http import openapi as doc
from quiver.server.http.errors import stream_error
from quiver.server.http.limits import RequestLimits
from quiver.server.http.openai_format import LogprobFormatter, merge_completion_logprobs, new_id, now, usage
from quiver.server.http.prepare import Job, Preparer
from quiver.server.http.protocol import ChatCompletionRequest, CompletionRequest
from quiver.server.http.responses import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk
from quiver.server.http.streams import collect, merge
from quiver.server.http.tools import ToolOutput, template_parser

# what the generation routes may answer besides 200 (413: a body over --max-request-bytes; 422: an adapter on
# disk that fails to read on first use; 499: the client left before a non-streaming answer; 500: the model
# failed on this request alone; 401/503/504: auth, backpressure and timeouts)
GENERATION_ERRORS = (400, 401, 404, 413, 422, 499, 500, 503, 504)


def add_generate_routes(app: FastAPI, engine: AsyncEngine, limits: RequestLimits, pool: Executor,
                        tool_parser: str | None = None) -> None:
    """Bodies are parsed, prompts tokenized, grammars compiled and requests checked in `pool`, off the
    event loop. tool_parser: tool_choice auto's format (default: the chat template's, if it has one)."""
    tok = engine.tokenizer
    fmt = LogprobFormatter(tok)
    prep = Preparer(engine, limits, tool_parser or template_parser(getattr(tok, "chat_template", None)))

    async def start(request: Request, model, prepare) -> tuple:
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(pool, model.model_validate_json, await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        limits.check_names(req)
        job = await loop.run_in_executor(pool, prepare, req)
        return req, job, job.adapter or engine.model_name

    def launch(job: Job, share: bool = True) -> list:
        """One engine request per choice, prompt-major; choices after the first fork the first."""
        gens = []
        for choices in job.requests:
            first = uuid.uuid4().hex
            for j, request in enumerate(choices):
                rid = first if j == 0 else uuid.uuid4().hex
                gens.append(engine.generate(request, request_id=rid, fork_of=first if j and share else None))
        return gens

    def counted(job: Job, latest: list) -> dict:
        """Usage from each choice's latest output (None before its first); a prompt, and how much of it the
        prefix cache held, count once, from its first choice (the others share its blocks)."""
        firsts = itertools.accumulate([0] + [len(c) for c in job.requests[:-1]])
        cached = sum(latest[k].num_cached_tokens for k in firsts if latest[k] is not None)
        return usage(sum(len(ids) for ids in job.prompts), sum(o.num_output_tokens for o in latest if o is not None),
                     cached)

    @app.post("/v1/completions", openapi_extra=doc.request_body(CompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=doc.ok(Completion, stream=CompletionChunk)))
    async def completions(request: Request):
        req, job, model = await start(request, CompletionRequest, prep.completion)
        n, rid, created = req.n, f"cmpl-{req.request_id}" if req.request_id else new_id("cmpl"), now()
        gens = launch(job, share=job.prompt_logprobs is None)  # prompt logprobs: each choice computes its own
        want_lp = job.prompt_logprobs

        def body(choices, use=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        def head(k: int, first_out) -> tuple[str, dict | None, int]:
            """Choice k's echo, its prompt logprobs and the text offset after them."""
            i = k // n
            if want_lp is None:
                return job.echo[i], None, len(job.echo[i])
            lp, offset = fmt.prompt_completion(job.prompts[i], first_out.prompt_logprobs or [])
            return job.echo[i], lp, offset

        if req.stream:
            options = req.stream_options

            async def events():
                offsets, latest, started = [0] * len(gens), [None] * len(gens), [False] * len(gens)
                try:
                    async for k, out in merge(gens):
                        text, lp = out.new_text, None
                        if not started[k]:
                            started[k] = True
                            echo, lp, offsets[k] = head(k, out)
                            text = echo + text
                        if req.logprobs is not None:
                            new, offsets[k] = fmt.completion(out.new_logprobs, offsets[k])
                            lp = merge_completion_logprobs([lp, new]) if lp else new
                        latest[k] = out
                        choice = {"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
                        running = counted(job, latest) if options and options.continuous_usage_stats else None
                        yield _sse(body([choice], running))
                except Exception as exc:  # noqa: BLE001 - whatever ends it, the stream ends with an error event
                    yield _sse(stream_error(exc).model_dump())
                if options and options.include_usage:
                    yield _sse(body([], counted(job, latest)))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        results = await collect(request, gens)
        if results is None:
            return Response(status_code=499)
        choices = []
        for k, outs in enumerate(results):
            echo, lp, offset = head(k, outs[0])
            if req.logprobs is not None:
                new = fmt.completion([e for o in outs for e in o.new_logprobs], offset)[0]
                lp = merge_completion_logprobs([lp, new]) if lp else new
            choices.append({"index": k, "text": echo + "".join(o.new_text for o in outs), "logprobs": lp,
                            "finish_reason": outs[-1].finish_reason})
        return body(choices, counted(job, [outs[-1] for outs in results]))

    chat_ok = doc.ok(ChatCompletion, stream=ChatCompletionChunk)

    @app.post("/v1/chat/completions", openapi_extra=doc.request_body(ChatCompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=chat_ok))
    async def chat(request: Request):
        req, job, model = await start(request, ChatCompletionRequest, prep.chat)
        rid, created = f"chatcmpl-{req.request_id}" if req.request_id else new_id("chatcmpl"), now()
        gens = launch(job)
        parse_tools = job.tools is not None and job.tools.mode != "none"

        def chunk(k, delta, finish=None, lp=None, use=None):
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [] if k is None else [{"index": k, "delta": delta, "logprobs": lp,
                                                     "finish_reason": finish}]}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            options = req.stream_options

            async def events():
                latest = [None] * len(gens)
                readers = [ToolOutput(job.tools) if parse_tools else None for _ in gens]
                for k in range(len(gens)):
                    yield _sse(chunk(k, {"role": "assistant", "content": ""}))
                try:
                    async for k, out in merge(gens):
                        latest[k] = out
                        lp = fmt.chat(out.new_logprobs) if req.logprobs else None
                        reader = readers[k]
                        if reader is None:
                            deltas = [{"content": out.new_text}] if out.new_text else []
                        else:
                            deltas = reader.feed(out.new_text) + (reader.finish() if out.finished else [])
                        finish = _finish_reason(reader, out.finish_reason) if out.finished else None
                        running = counted(job, latest) if options and options.continuous_usage_stats else None
                        if not deltas and (finish or lp):
                            deltas = [{}]
                        for d, delta in enumerate(deltas):
                            last = d == len(deltas) - 1
                            yield _sse(chunk(k, delta, finish if last else None, lp if d == 0 else None,
                                             running if last else None))
                except Exception as exc:  # noqa: BLE001 - whatever ends it, the stream ends with an error event
                    yield _sse(stream_error(exc).model_dump())
                if options and options.include_usage:
                    yield _sse(chunk(None, {}, use=counted(job, latest)))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        results = await collect(request, gens)
        if results is None:
            return Response(status_code=499)
        choices = []
        for k, outs in enumerate(results):
            text = "".join(o.new_text for o in outs)
            message = {"role": "assistant", "content": text}
            reader = None
            if parse_tools:
                reader = ToolOutput(job.tools)
                reader.feed(text)
                reader.finish()
                message = {"role": "assistant", "content": reader.content.strip() or None}
                if reader.calls:
                    message["tool_calls"] = reader.calls
            lp = fmt.chat([e for o in outs for e in o.new_logprobs]) if req.logprobs else None
            choices.append({"index": k, "message": message, "logprobs": lp,
                            "finish_reason": _finish_reason(reader, outs[-1].finish_reason)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": counted(job, [outs[-1] for outs in results])}


def _finish_reason(reader: ToolOutput | None, reason: str | None) -> str | None:
    """tool_calls when the model called tools (and was not cut off), else the engine's reason."""
    if reader is not None and reason == "stop" and reader.finish_reason:
        return reader.finish_reason
    return reason


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
