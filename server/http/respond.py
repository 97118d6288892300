"""What both generation routes do with a request: parse and prepare it off the event loop, start one engine
request per choice, then answer whole or as server-sent events. completions.py and chat.py say only what
their bodies look like (a writer: their chunks and their whole answer, from engine outputs).

Choice j of a prompt shares the prompt's KV blocks with choice 0 (LLMEngine.add's fork_of). Choices are
numbered prompt-major (prompt i, choice j: i * n + j), usage counts each prompt once and every choice's
tokens, and `model` names the adapter that ran.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from quiver.server.engine.public import AsyncEngine, RequestOutput, RequestTimeout
from quiver.server.http.errors import stream_error
from quiver.server.http.limits import RequestLimits
from quiver.server.http.openai_format import LogprobFormatter, usage
from quiver.server.http.prepare import Job, Preparer
from quiver.server.http.responses import Usage, json_body, sse
from quiver.server.http.streams import collect, merge
from quiver.server.http.tenants import access_of
from quiver.server.http.tools import template_parser

# what the generation routes may answer besides 200 (413: a body over --max-request-bytes; 422: an adapter on
# disk that fails to read on first use; 499: the client left before a non-streaming answer; 500: the model
# failed on this request alone; 401/503/504: auth, backpressure or shutdown, and timeouts)
GENERATION_ERRORS = (400, 401, 404, 413, 422, 499, 500, 503, 504)
DONE = "data: [DONE]\n\n"


class Writer(Protocol):
    """One request's answer in its API's bodies."""

    def opening(self) -> list[BaseModel]:
        """The chunks a stream starts with, before any output."""

    def chunks(self, k: int, out: RequestOutput, usage: Usage | None) -> list[BaseModel]:
        """The chunks choice k's new output makes (`usage`: the running count, for the last of them)."""

    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The chunk with no choices that ends a stream with stream_options.include_usage."""

    def whole(self, results: list[list[RequestOutput]], usage: Usage) -> BaseModel:
        """The non-streaming answer: each choice's outputs, in order."""


@dataclass
class Generation:
    """What both routes share: the engine, the bounds, the pool requests are prepared in, and their tools."""
    engine: AsyncEngine
    limits: RequestLimits
    pool: Executor
    prep: Preparer
    fmt: LogprobFormatter

    @classmethod
    def build(cls, engine: AsyncEngine, limits: RequestLimits, pool: Executor,
              tool_parser: str | None = None) -> Generation:
        """tool_parser: tool_choice auto's format (default: the chat template's, if it has one)."""
        tok = engine.tokenizer
        prep = Preparer(engine, limits, tool_parser or template_parser(getattr(tok, "chat_template", None)))
        return cls(engine, limits, pool, prep, LogprobFormatter(tok))

    async def prepare(self, request: Request, model: type[BaseModel], prepare) -> tuple:
        """(the body as `model`, its Job from `prepare(body, access)`, access: what the request's key may use,
        the guard's request.state.access): parsing, tokenizing, compiling its grammar and checking it all happen
        in the pool, off the event loop, and within --request-timeout (504 past it), which counts from the
        request's arrival to its last token: the job carries that deadline to generation."""
        loop = asyncio.get_running_loop()
        limit = self.engine.request_timeout
        deadline = None if limit is None else loop.time() + limit
        try:
            req = await self._within(loop.run_in_executor(self.pool, model.model_validate_json, await request.body()),
                                     deadline)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        self.limits.check_names(req)
        job = await self._within(loop.run_in_executor(self.pool, prepare, req, access_of(request)), deadline)
        job.deadline = deadline
        return req, job

    async def _within(self, work, deadline: float | None):
        if deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(deadline - asyncio.get_running_loop().time(), 0))
        except asyncio.TimeoutError:
            raise RequestTimeout(self.engine.request_timeout) from None

    def model_name(self, job: Job) -> str:
        """What a response's `model` says: the adapter that ran, else the base model."""
        return job.adapter or self.engine.model_name

    def launch(self, job: Job, share: bool = True) -> list:
        """One engine request per choice, prompt-major; choices after the first fork the first."""
        gens = []
        for choices in job.requests:
            first = uuid.uuid4().hex
            for j, request in enumerate(choices):
                rid = first if j == 0 else uuid.uuid4().hex
                gens.append(self.engine.generate(request, request_id=rid, fork_of=first if j and share else None,
                                                 deadline=job.deadline))
        return gens

    async def respond(self, request: Request, req, job: Job, gens: list, writer: Writer) -> Response:
        """The stream, or the whole answer once every choice has finished (499 if the client left first)."""
        if req.stream:
            return StreamingResponse(_events(req.stream_options, job, gens, writer), media_type="text/event-stream")
        results = await collect(request, gens)
        if results is None:
            return Response(status_code=499)
        whole = functools.partial(writer.whole, results, counted(job, [outs[-1] for outs in results]))
        return await _format(job, lambda: json_body(whole()))


async def _events(options, job: Job, gens: list, writer: Writer):
    """The server-sent events: the writer's chunks as outputs arrive (with running usage if asked), an error
    event if the stream breaks, the usage chunk if asked, then [DONE]."""
    latest: list[RequestOutput | None] = [None] * len(gens)
    running = options is not None and options.continuous_usage_stats
    for chunk in writer.opening():
        yield sse(chunk)
    try:
        async for k, out in merge(gens):
            latest[k] = out
            chunks = functools.partial(writer.chunks, k, out, counted(job, latest) if running else None)
            for event in await _format(job, lambda: [sse(chunk) for chunk in chunks()]):
                yield event
    except Exception as exc:  # noqa: BLE001 - whatever ends it, the stream ends with an error event
        yield sse(stream_error(exc))
    if options is not None and options.include_usage:
        yield sse(writer.usage_chunk(counted(job, latest)))
    yield DONE


async def _format(job: Job, make):
    """make(): on the event loop, or, where echo with logprobs formats an entry per prompt token (0.17 s for
    8k tokens), on a worker thread."""
    return await asyncio.to_thread(make) if job.prompt_logprobs is not None else make()


def counted(job: Job, latest: list) -> Usage:
    """Usage from each choice's latest output (None before its first); a prompt, and how much of it the
    prefix cache held, count once, from its first choice (the others share its blocks)."""
    firsts = itertools.accumulate([0] + [len(c) for c in job.requests[:-1]])
    cached = sum(latest[k].num_cached_tokens for k in firsts if latest[k] is not None)
    return usage(sum(len(ids) for ids in job.prompts), sum(o.num_output_tokens for o in latest if o is not None),
                 cached)
