"""The generation routes: /v1/completions and /v1/chat/completions, streaming or not."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.llm_engine import RequestOutput
from quiver.server.engine.sampling import InvalidParam
from quiver.server.http import openapi as doc
from quiver.server.http.errors import stream_error
from quiver.server.http.limits import RequestLimits
from quiver.server.http.openai_format import LogprobFormatter, merge_completion_logprobs, new_id, now, usage
from quiver.server.http.protocol import ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_S = 0.25
# what the generation routes may answer besides 200 (413: a body over --max-request-bytes; 422: an adapter on
# disk that fails to read on first use; 499: the client left before a non-streaming answer; 500: the model
# failed on this request alone; 401/503/504: auth, backpressure and timeouts)
GENERATION_ERRORS = (400, 401, 404, 413, 422, 499, 500, 503, 504)


def add_generate_routes(app: FastAPI, engine: AsyncEngine, limits: RequestLimits, pool: Executor) -> None:
    """Bodies are parsed, prompts tokenized and requests checked in `pool`, off the event loop."""
    tok = engine.tokenizer
    fmt = LogprobFormatter(tok)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def parse(request: Request, model):
        try:
            req = await off_loop(model.model_validate_json, await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        limits.check_names(req)
        if req.n != 1:
            raise InvalidParam("n", "only n=1 is supported")
        return req

    def adapter_of(req) -> str | None:
        if req.adapter:
            return req.adapter
        if req.model in (None, "", engine.model_name):
            return None
        return req.model  # a model name that is not the base names an adapter, as in vLLM

    def prepare_completion(req, adapter):
        prompts = _prompt_ids(req.prompt, tok, limits)
        want_prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = [req.sampling(req.max_tokens if req.max_tokens is not None else 16, req.logprobs, want_prompt_lp)
                  for _ in prompts]
        limits.check_sampling(params[0])
        for ids, p in zip(prompts, params):
            engine.check_request(ids, p, adapter)
        return prompts, params, want_prompt_lp, [tok.decode(ids) if req.echo else "" for ids in prompts]

    def prepare_chat(req, adapter):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
        except Exception as exc:
            raise InvalidParam("messages", f"the chat template cannot render these messages: {exc}") from exc
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # what the context leaves, the adapter's virtual tokens included
            max_tokens = max(engine.max_model_len - len(ids) - engine.virtual_tokens(adapter), 1)
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        limits.check_sampling(params)
        engine.check_request(ids, params, adapter)
        return ids, params

    @app.post("/v1/completions", openapi_extra=doc.request_body(CompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=doc.ok(doc.Completion, stream=doc.CompletionChunk)))
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        adapter = adapter_of(req)
        prompts, params, want_prompt_lp, echo_texts = await off_loop(prepare_completion, req, adapter)
        rid, created = new_id("cmpl"), now()
        gens = [engine.generate(ids, p, adapter) for ids, p in zip(prompts, params)]

        def body(choices, use=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": req.model or engine.model_name,
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
                except Exception as exc:  # noqa: BLE001 - whatever ends it, the stream ends with an error event
                    yield _sse(stream_error(exc))
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

    chat_ok = doc.ok(doc.ChatCompletion, stream=doc.ChatCompletionChunk)

    @app.post("/v1/chat/completions", openapi_extra=doc.request_body(ChatCompletionRequest),
              responses=doc.responses(*GENERATION_ERRORS, ok=chat_ok))
    async def chat(request: Request):
        req = await parse(request, ChatCompletionRequest)
        adapter = adapter_of(req)
        ids, params = await off_loop(prepare_chat, req, adapter)
        rid, created, model = new_id("chatcmpl"), now(), req.model or engine.model_name
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
                except Exception as exc:  # noqa: BLE001 - whatever ends it, the stream ends with an error event
                    yield _sse(stream_error(exc))
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


def _prompt_ids(prompt, tokenizer, limits: RequestLimits) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidParam("prompt", "prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    limits.check_prompts(len(prompt))
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
