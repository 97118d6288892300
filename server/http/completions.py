"""POST /v1/completions: its choices and chunks, from the engine's outputs (respond.py runs the request).

A choice's text starts with its prompt when the request echoes it, and with echo and logprobs its logprobs
start with the prompt's (the first prompt token's logprob is null).
"""
from __future__ import annotations

from fastapi import FastAPI, Request

from quiver.server.engine.public import RequestOutput
from quiver.server.http import openapi as doc
from quiver.server.http.openai_format import LogprobFormatter, merge_completion_logprobs, new_id, now
from quiver.server.http.prepare import Job
from quiver.server.http.protocol import CompletionRequest
from quiver.server.http.respond import GENERATION_ERRORS, Generation
from quiver.server.http.responses import (Completion, CompletionChoice, CompletionChunk, CompletionLogprobs,
                                          Usage, stream_chunk)


def add_completions_route(app: FastAPI, gen: Generation) -> None:
    @app.post("/v1/completions", openapi_extra=doc.request_body(CompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=doc.ok(Completion, stream=CompletionChunk)))
    async def completions(request: Request):
        req, job = await gen.prepare(request, CompletionRequest, gen.prep.completion)
        gens = gen.launch(job, share=job.prompt_logprobs is None)  # prompt logprobs: each choice computes its own
        return await gen.respond(request, req, job, gens, Completions(req, job, gen.fmt, gen.model_name(job)))


class Completions:
    """One request's text_completion bodies (respond.Writer)."""

    def __init__(self, req: CompletionRequest, job: Job, fmt: LogprobFormatter, model: str):
        self.req, self.job, self.fmt = req, job, fmt
        self.stamp = dict(id=f"cmpl-{req.request_id}" if req.request_id else new_id("cmpl"), object="text_completion",
                          created=now(), model=model)
        self.offsets, self.started = [0] * job.choices, [False] * job.choices  # streaming: each choice's so far

    def head(self, k: int, first: RequestOutput) -> tuple[str, CompletionLogprobs | None, int]:
        """Choice k's echo, its prompt logprobs and the text offset after them."""
        i = k // self.req.n
        echo = self.job.echo[i]
        if self.job.prompt_logprobs is None:
            return echo, None, len(echo)
        lp, offset = self.fmt.prompt_completion(self.job.prompts[i], first.prompt_logprobs or [])
        return echo, lp, offset

    def opening(self) -> list[CompletionChunk]:
        return []

    def chunks(self, k: int, out: RequestOutput, usage: Usage | None) -> list[CompletionChunk]:
        text, lp = out.new_text, None
        if not self.started[k]:
            self.started[k] = True
            echo, lp, self.offsets[k] = self.head(k, out)
            text = echo + text
        if self.req.logprobs is not None:
            new, self.offsets[k] = self.fmt.completion(out.new_logprobs, self.offsets[k])
            lp = merge_completion_logprobs(lp, new)
        choice = CompletionChoice(index=k, text=text, logprobs=lp, finish_reason=out.finish_reason)
        return [self.chunk([choice], usage)]

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return self.chunk([], usage)

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionChunk:
        return stream_chunk(CompletionChunk, self.stamp, choices, usage)

    def whole(self, results: list[list[RequestOutput]], usage: Usage) -> Completion:
        choices = []
        for k, outs in enumerate(results):
            echo, lp, offset = self.head(k, outs[0])
            if self.req.logprobs is not None:
                lp = merge_completion_logprobs(lp, self.fmt.completion([e for o in outs for e in o.new_logprobs],
                                                                       offset)[0])
            choices.append(CompletionChoice(index=k, text=echo + "".join(o.new_text for o in outs), logprobs=lp,
                                            finish_reason=outs[-1].finish_reason))
        return Completion(**self.stamp, choices=choices, usage=usage)
