"""POST /v1/chat/completions: its choices and chunks, from the engine's outputs (respond.py runs the request).

A stream opens with an assistant role chunk per choice; with tools (tool_choice other than none) each
choice's text is read as content and tool calls (tools.py), whole or as it streams.
"""
from __future__ import annotations

from fastapi import FastAPI, Request

from quiver.server.engine.public import RequestOutput
from quiver.server.http import openapi as doc
from quiver.server.http.openai_format import LogprobFormatter, new_id, now
from quiver.server.http.prepare import Job
from quiver.server.http.protocol import ChatCompletionRequest
from quiver.server.http.respond import GENERATION_ERRORS, Generation
from quiver.server.http.responses import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                          ChatCompletionChunk, ChatDelta, ChatLogprobs, Usage, stream_chunk)
from quiver.server.http.tools import ToolOutput


def add_chat_route(app: FastAPI, gen: Generation) -> None:
    @app.post("/v1/chat/completions", openapi_extra=doc.request_body(ChatCompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=doc.ok(ChatCompletion, stream=ChatCompletionChunk)))
    async def chat(request: Request):
        req, job = await gen.prepare(request, ChatCompletionRequest, gen.prep.chat)
        gens = gen.launch(job)
        return await gen.respond(request, req, job, gens, Chat(req, job, gen.fmt, gen.model_name(job)))


class Chat:
    """One request's chat.completion bodies (respond.Writer)."""

    def __init__(self, req: ChatCompletionRequest, job: Job, fmt: LogprobFormatter, model: str):
        self.req, self.job, self.fmt = req, job, fmt
        self.stamp = dict(id=f"chatcmpl-{req.request_id}" if req.request_id else new_id("chatcmpl"),
                          created=now(), model=model)
        self.tools = job.tools if job.tools is not None and job.tools.mode != "none" else None
        self.readers = [self.reader() for _ in range(job.choices)]  # streaming: each choice's, as it goes

    def reader(self) -> ToolOutput | None:
        return ToolOutput(self.tools) if self.tools is not None else None

    def logprobs(self, outs: list[RequestOutput]) -> ChatLogprobs | None:
        return self.fmt.chat([e for o in outs for e in o.new_logprobs]) if self.req.logprobs else None

    # ---- streaming -------------------------------------------------------------------------
    def opening(self) -> list[ChatCompletionChunk]:
        return [self.delta_chunk(k, {"role": "assistant", "content": ""}) for k in range(self.job.choices)]

    def chunks(self, k: int, out: RequestOutput, usage: Usage | None) -> list[ChatCompletionChunk]:
        lp, reader = self.logprobs([out]), self.readers[k]
        if reader is None:
            deltas = [{"content": out.new_text}] if out.new_text else []
        else:
            deltas = reader.feed(out.new_text) + (reader.finish() if out.finished else [])
        finish = _finish_reason(reader, out.finish_reason) if out.finished else None
        if not deltas and (finish or lp is not None):
            deltas = [{}]
        last = len(deltas) - 1
        return [self.delta_chunk(k, delta, finish if d == last else None, lp if d == 0 else None,
                                 usage if d == last else None) for d, delta in enumerate(deltas)]

    def delta_chunk(self, k: int, delta: dict, finish: str | None = None, lp: ChatLogprobs | None = None,
                    usage: Usage | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=k, delta=ChatDelta(**delta), logprobs=lp, finish_reason=finish)
        return self.chunk([choice], usage)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunk([], usage)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None) -> ChatCompletionChunk:
        return stream_chunk(ChatCompletionChunk, {**self.stamp, "object": "chat.completion.chunk"}, choices, usage)

    # ---- whole -----------------------------------------------------------------------------
    def whole(self, results: list[list[RequestOutput]], usage: Usage) -> ChatCompletion:
        choices = []
        for k, outs in enumerate(results):
            text, reader = "".join(o.new_text for o in outs), self.reader()
            if reader is None:
                message = AssistantMessage(role="assistant", content=text)
            else:
                reader.feed(text)
                reader.finish()
                fields = {"role": "assistant", "content": reader.content.strip() or None}
                if reader.calls:  # absent, not null, when there are none
                    fields["tool_calls"] = reader.calls
                message = AssistantMessage(**fields)
            choices.append(ChatChoice(index=k, message=message, logprobs=self.logprobs(outs),
                                      finish_reason=_finish_reason(reader, outs[-1].finish_reason)))
        return ChatCompletion(**self.stamp, object="chat.completion", choices=choices, usage=usage)


def _finish_reason(reader: ToolOutput | None, reason: str | None) -> str | None:
    """tool_calls when the model called tools (and was not cut off), else the engine's reason."""
    if reader is not None and reason == "stop" and reader.finish_reason:
        return reader.finish_reason
    return reason
