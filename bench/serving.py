"""Online serving under an open-loop load: streaming POST /v1/completions sent at Poisson arrival
times (each at its time, whether or not earlier ones finished) over N LoRA adapters (r=16, all seven
projections) picked uniformly or by a Zipf law, against `quiver serve`. Reports time to first token,
inter-token latency and end-to-end latency percentiles, request and output-token throughput.

    quiver bench serving [--adapters 8] [--rate 2] [--requests 64] [--distribution uniform|zipf]
                            [--max-tokens 64] [--prompt-tokens 32] [--url URL --adapter-names a b]
                            [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]

--device and --dtype go to the started `quiver serve` (and the model the adapters are made from); with
--url the server is someone else's, and the result records its device and dtype as unknown (null).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from quiver.bench.common import (BASE, add_device_args, add_out_arg, dtype_name, machine, percentiles, release,
                                 results_dir, write_json)
from quiver.bench.throughput import prompts



# ---- the schedule (pure, seeded) ---------------------------------------------------------------
def arrival_times(rng: random.Random, n: int, rate: float) -> list[float]:
    """Poisson process: exponential gaps of mean 1/rate; rate <= 0 or inf sends everything at once."""
    if rate <= 0 or rate == float("inf"):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def zipf_weights(k: int, s: float) -> list[float]:
    """P(rank i) proportional to 1/i^s, i = 1..k, normalised."""
    w = [1.0 / (i ** s) for i in range(1, k + 1)]
    total = sum(w)
    return [x / total for x in w]


def choose_adapters(rng: random.Random, names: list[str], n: int, distribution: str,
                    zipf_s: float = 1.1) -> list[str | None]:
    """Which adapter each request names (None: the base model); names[0] is the most popular under zipf."""
    if not names:
        return [None] * n
    if distribution == "uniform":
        return [rng.choice(names) for _ in range(n)]
    if distribution == "zipf":
        return rng.choices(names, weights=zipf_weights(len(names), zipf_s), k=n)
    raise ValueError(f"unknown distribution {distribution!r}")


def make_prompt(i: int, tokens: int) -> str:
    """A topic sentence padded with a repeated one-token word to about `tokens` tokens."""
    text = prompts(i + 1)[i]
    filler = max(0, tokens - (len(text.split()) + 2))
    return text + " again" * filler


# ---- the load ------------------------------------------------------------------------------------
async def one_request(client, url: str, payload: dict, send_at: float, t_start: float) -> dict:
    """Wait for the scheduled time, send one streaming completion, time its chunks."""
    import httpx

    await asyncio.sleep(max(0.0, t_start + send_at - time.perf_counter()))
    rec = {"adapter": payload.get("model") or BASE, "scheduled_s": send_at, "status": None, "error": None,
           "ttft_s": None, "itl_s": [], "e2e_s": None, "completion_tokens": 0}
    t0 = time.perf_counter()
    rec["sent_s"] = t0 - t_start
    chunks: list[float] = []
    usage = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=payload) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = (await resp.aread()).decode(errors="replace")[:300]
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        rec["error"] = data["error"].get("message", str(data["error"]))
                    elif data.get("choices"):
                        chunks.append(time.perf_counter())
                    if data.get("usage"):
                        usage = data["usage"]
    except (httpx.HTTPError, ValueError) as exc:  # a failed request is a result, not a crash of the bench
        rec["error"] = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    rec["finished_s"] = end - t_start
    if chunks:
        rec["ttft_s"] = chunks[0] - t0
        rec["itl_s"] = [b - a for a, b in itertools.pairwise(chunks)]
    rec["completion_tokens"] = usage["completion_tokens"] if usage else len(chunks)
    rec["e2e_s"] = end - t0
    if rec["error"] is None and not chunks:
        rec["error"] = "no tokens streamed"
    return rec


async def run_load(url: str, schedule: list[float], adapters: list[str | None], prompt_tokens: int,
                   max_tokens: int) -> tuple[list[dict], float]:
    """All requests as tasks of one event loop (open loop); returns the records and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=len(schedule) + 1, max_keepalive_connections=len(schedule) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        payloads = []
        for i, adapter in enumerate(adapters):
            p = {"prompt": make_prompt(i, prompt_tokens), "max_tokens": max_tokens, "temperature": 0,
                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if adapter is not None:
                p["model"] = adapter
            payloads.append(p)
        t_start = time.perf_counter()
        records = await asyncio.gather(*(one_request(client, url, p, t, t_start)
                                         for p, t in zip(payloads, schedule)))
        return list(records), time.perf_counter() - t_start


def warm_up(url: str) -> None:
    """One short request first, so the first measured one does not pay for lazy setup."""
    import httpx
    httpx.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=300).raise_for_status()


# ---- the report ----------------------------------------------------------------------------------
def _ms(xs) -> list[float]:
    return [1000 * x for x in xs]


def summarize(records: list[dict], duration: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
            "duration_s": duration, "request_throughput": len(ok) / duration if duration > 0 else 0.0,
            "output_tokens": tokens, "output_token_throughput": tokens / duration if duration > 0 else 0.0,
            "ttft_ms": percentiles(_ms([r["ttft_s"] for r in ok])),
            "itl_ms": percentiles(_ms([x for r in ok for x in r["itl_s"]])),
            "e2e_ms": percentiles(_ms([r["e2e_s"] for r in ok])),
            "per_adapter": dict(sorted(Counter(r["adapter"] for r in records).items()))}


def print_latency(s: dict, rows: tuple[tuple[str, str], ...]) -> None:
    """One line of mean/p50/p90/p99 per (key, label) of `percentiles()` results in s."""
    print(f"{'latency (ms)':14s}{'mean':>10s}{'p50':>10s}{'p90':>10s}{'p99':>10s}")
    for key, label in rows:
        cells = "".join(f"{s[key][k]:10.1f}" if s[key][k] is not None else f"{'-':>10s}"
                        for k in ("mean", "p50", "p90", "p99"))
        print(f"{label:14s}{cells}")


def print_table(s: dict) -> None:
    print(f"requests {s['requests']}  completed {s['completed']}  errors {s['errors']}  "
          f"duration {s['duration_s']:.2f} s")
    print(f"request throughput {s['request_throughput']:.3f} req/s   "
          f"output token throughput {s['output_token_throughput']:.1f} tok/s")
    print_latency(s, (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "end-to-end")))
    print("requests per adapter: " + ", ".join(f"{k} {v}" for k, v in s["per_adapter"].items()), flush=True)


def latency_plot(path: Path, records: list[dict], title: str) -> Path:
    """Empirical CDFs of TTFT and ITL, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["error"] is None]
    series = {"TTFT": sorted(1000 * r["ttft_s"] for r in ok),
              "inter-token latency": sorted(1000 * x for r in ok for x in r["itl_s"])}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    for ax, (label, xs) in zip(axes, series.items()):
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", color="#4c72b0")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{label}, {len(xs)} samples", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- the server ----------------------------------------------------------------------------------
def write_adapters(model_dir: Path, root: Path, n: int, rank: int, device: str = "cpu",
                   dtype=None) -> dict[str, Path]:
    """n random LoRA adapters on all seven projections, named adapter0..adapter{n-1}, made from the model
    loaded on `device` in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quiver.bench.adapters import make_adapters

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).to(device)
    paths = make_adapters(hf, root, n, rank)
    del hf
    release(device)  # before the server loads its own copy
    return {p.name: p for p in paths}


def start_server(args, adapters: dict[str, Path], log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "quiver"), "serve", "--port", str(args.port), "--log-level", "WARNING",
           "--device", args.device, "--dtype", args.dtype]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.threads:
        cmd += ["--num-threads", str(args.threads)]
    if adapters:
        cmd += ["--max-loras", str(len(adapters)), "--max-lora-rank", str(args.rank)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    """Poll /health; fail with the server's own log if it exits or never answers."""
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"quiver serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"quiver serve not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def served_model(url: str) -> str | None:
    import httpx
    try:
        return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def measure(args, url: str, names: list[str]) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    schedule = arrival_times(rng, args.requests, args.rate)
    adapters = choose_adapters(rng, names, args.requests, args.distribution, args.zipf_s)
    warm_up(url)
    return asyncio.run(run_load(url, schedule, adapters, args.prompt_tokens, args.max_tokens))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench serving")
    ap.add_argument("--url", default=None, help="a running server to load (default: start `quiver serve`)")
    ap.add_argument("--adapter-names", nargs="*", default=[], help="with --url: adapters to spread requests over")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--port", type=int, default=8767)
    ap.add_argument("--threads", type=int, default=None, help="--num-threads of the started server")
    add_device_args(ap)  # of the started server
    ap.add_argument("--adapters", type=int, default=8, help="random LoRA adapters for the started server")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rate", type=float, default=2.0, help="mean requests/s (Poisson); inf: all at once")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--distribution", choices=["uniform", "zipf"], default="uniform")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="approximate prompt length")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    add_out_arg(ap)
    args = ap.parse_args(argv)

    if args.url:
        url, names = args.url.rstrip("/"), list(args.adapter_names)
        records, duration = measure(args, url, names)
        model = served_model(url)
        device = dtype = None  # the server's own, not known here
    else:
        import torch

        from quiver.server.engine.device import resolve_dtype
        from quiver.server.model.checkpoint import resolve_model

        model_dir, model = resolve_model(args.model)
        device, dtype = args.device, dtype_name(resolve_dtype(args.dtype, torch.device(args.device), model_dir))
        url = f"http://127.0.0.1:{args.port}"
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths = (write_adapters(model_dir, root, args.adapters, args.rank, args.device, getattr(torch, dtype))
                     if args.adapters else {})
            names = list(paths)
            log = root / "server.log"
            proc = start_server(args, paths, log)
            try:
                wait_healthy(proc, url, log)
                records, duration = measure(args, url, names)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    summary = summarize(records, duration)
    print_table(summary)
    options = {k: (str(v) if isinstance(v, Path) or v == float("inf") else v) for k, v in vars(args).items()}
    result = {"benchmark": "serving", "model": model, "device": device, "dtype": dtype, "options": options,
              "adapter_names": names,
              "machine": machine(), **summary,
              "per_request": [{k: r[k] for k in ("adapter", "scheduled_s", "sent_s", "finished_s", "status",
                                                 "error", "ttft_s", "e2e_s", "completion_tokens")}
                              for r in records]}
    out_dir = results_dir(args.out)
    title = (f"{args.requests} requests at {args.rate:g} req/s over {len(names) or 'no'} adapters "
             f"({args.distribution}), {args.max_tokens} output tokens each")
    result["plot"] = str(latency_plot(out_dir / "serving.png", records, title))
    print("wrote", write_json("serving", result, out_dir), "and", result["plot"])
    return result
