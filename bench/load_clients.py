"""The load test's traffic: streaming clients that record each request, and the reference re-runs
(bench/load.py runs them and checks the results)."""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from quiver.bench.common import BASE

@dataclass(slots=True)
class Record:
    client: int
    model: str  # adapter name, or BASE
    prompt: int  # index into the prompt list
    max_tokens: int
    sent_s: float  # since the start of the load
    end_s: float = 0.0
    ttft_s: float | None = None
    tokens: int = 0
    status: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""


async def stream_one(client, url: str, payload: dict, rec: Record, t_start: float,
                     chunks: list[str] | None = None) -> Record:
    """Send one streaming completion; fill in `rec` (and the per-token texts into `chunks`, if given)."""
    import httpx

    t0 = time.perf_counter()
    parts: list[str] = []
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=payload) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: " + (await resp.aread()).decode(errors="replace")[:300]
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        rec.error = "error event: " + str(data["error"].get("message", data["error"]))[:300]
                    for choice in data.get("choices") or ():
                        if rec.ttft_s is None:
                            rec.ttft_s = time.perf_counter() - t0
                        rec.tokens += 1
                        parts.append(choice.get("text") or "")
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, ValueError) as exc:  # a failed request is a result, not a crash of the load
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.end_s = time.perf_counter() - t_start
    rec.text = "".join(parts)
    if chunks is not None:
        chunks.extend(parts)
    if rec.error is None:
        if not done:
            rec.error = "the stream ended without [DONE]"
        elif rec.tokens != rec.max_tokens or rec.finish_reason != "length":
            rec.error = f"{rec.tokens} tokens (finish_reason {rec.finish_reason}), expected {rec.max_tokens} (length)"
    return rec


def payload_for(model: str, base_name: str, prompt: str, max_tokens: int) -> dict:
    return {"model": base_name if model == BASE else model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}


async def client_loop(i: int, client, url: str, base_name: str, models: list[str], prompts: list[str],
                      max_tokens: int, rng: random.Random, t_start: float, deadline: float,
                      records: list[Record]) -> None:
    """Closed loop: the next request as soon as the previous one has finished, until the deadline."""
    lo = max(1, max_tokens // 2)
    while time.perf_counter() < deadline:
        model, prompt, n = rng.choice(models), rng.randrange(len(prompts)), rng.randint(lo, max_tokens)
        rec = Record(i, model, prompt, n, time.perf_counter() - t_start)
        records.append(await stream_one(client, url, payload_for(model, base_name, prompts[prompt], n), rec, t_start))


async def run_load(url: str, base_name: str, models: list[str], prompts: list[str], args,
                   t_start: float) -> list[Record]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    records: list[Record] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=30.0), limits=limits) as client:
        deadline = t_start + args.duration
        await asyncio.gather(*(client_loop(i, client, url, base_name, models, prompts, args.max_tokens,
                                           random.Random(f"{args.seed}:{i}"), t_start, deadline, records)
                               for i in range(args.clients)))
    return records


def pick_reference(records: list[Record], k: int, rng: random.Random) -> list[Record]:
    """Up to k completed requests, round-robin over the models (each model's in seeded random order)."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.error is None:
            groups.setdefault(r.model, []).append(r)
    order = sorted(groups)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(groups[name])
    out: list[Record] = []
    while len(out) < k and any(groups.values()):
        for name in order:
            if groups[name] and len(out) < k:
                out.append(groups[name].pop())
    return out


async def run_reference(url: str, base_name: str, prompts: list[str], sample: list[Record]) -> list[dict]:
    """Each sampled request again, alone (one at a time), greedy: its text must equal the load's."""
    import httpx

    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=30.0)) as client:
        for r in sample:
            ref = Record(-1, r.model, r.prompt, r.max_tokens, 0.0)
            chunks: list[str] = []
            t0 = time.perf_counter()
            await stream_one(client, url, payload_for(r.model, base_name, prompts[r.prompt], r.max_tokens), ref,
                             t0, chunks)
            agreed = 0  # reference tokens whose text, in order, is a prefix of the load's text
            acc = ""
            for c in chunks:
                acc += c
                if not r.text.startswith(acc):
                    break
                agreed += 1
            rows.append({"model": r.model, "prompt": r.prompt, "max_tokens": r.max_tokens, "error": ref.error,
                         "match": ref.error is None and ref.text == r.text, "tokens_agreed": agreed,
                         "load_text": r.text, "reference_text": ref.text})
    return rows
