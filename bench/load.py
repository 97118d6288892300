"""Load test: a bounded, closed-loop soak of an in-process server on loopback.

N client tasks (one shared httpx connection pool) each send streaming /v1/completions back to back
(greedy, ignore_eos, max_tokens drawn from [max_tokens/2, max_tokens] by a seeded RNG) for a fixed
time, spread over the base model and 8 adapters of mixed families: 3 LoRA (r=8, all seven
projections), 1 prompt tuning, 1 p-tuning, 2 prefix tuning, 1 bottleneck, all generated from the
base model into a temporary folder. The server is the real FastAPI app under uvicorn in a thread,
around an AsyncEngine whose loop runs on its own thread.

It measures requests/s, output tokens/s, TTFT / time-per-output-token / end-to-end percentiles and
the process RSS (sampled every second), and checks, failing (AssertionError) otherwise:
  - zero errors: every request answers 200, streams no error event, ends with [DONE], and produces
    exactly its max_tokens tokens with finish_reason "length";
  - no leaks: once idle, no request is left in the engine, every KV block is free except the ones
    the prefix adapters hold (each held by its adapter alone), every adapter unloads (none is still
    pinned by a request), and then every block is free and no LoRA slot is occupied;
  - reference outputs: a seeded sample of completed requests covering every adapter is re-run
    alone, after the load, and must produce the same text;
  - flat RSS: at the end at most max(10%, 64 MiB) above the RSS after warm-up (25% of the duration).

    quiver bench load [--clients 64] [--duration 240] [--model DIR] [--max-tokens 32] [--out DIR]
                         [--reference-sample 16] [--seed 0] [--kv-cache-mb MB] [--threads N]
                         [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from quiver.bench.common import (BASE, LoopbackServer, add_device_args, add_out_arg, cuda_peak, dtype_name, machine,
                                 percentiles, release, write_json)
from quiver.bench.load_clients import Record, pick_reference, run_load, run_reference
from quiver.bench.serving import make_prompt, print_latency

# the adapter mix: family -> how many
PLAN = {"lora": 3, "prompt_tuning": 1, "p_tuning": 1, "prefix_tuning": 2, "bottleneck": 1}
PROMPT_TOKENS = (6, 10, 16, 24, 32, 48)  # approximate prompt lengths of the prompt list
WARM_UP_FRACTION = 0.25
RSS_TOLERANCE = (0.10, 64 * 2**20)  # relative, absolute: the larger one applies
MiB = 2**20


def build_adapters(engine, root: Path, rank: int, virtual: int) -> dict[str, str]:
    """Generate the PLAN's adapters from the base model into `root` and load them: name -> family."""
    from transformers import AutoModelForCausalLM

    from quiver.bench.adapters import make_adapters
    from quiver.bench.families import make_bottleneck_adapters, make_prompt_adapters

    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(engine.device).eval()
    mc = engine.model_config
    families: dict[str, str] = {}
    for kind, n in PLAN.items():
        if kind == "lora":
            paths = make_adapters(hf, root, n, rank)
        elif kind == "bottleneck":
            paths = make_bottleneck_adapters(mc.hidden_size, mc.num_layers, root, n)
        else:
            paths = make_prompt_adapters(hf, root, kind, n, virtual)
        for i, path in enumerate(paths):
            name = f"{kind}{i}"
            engine.load_adapter(name, str(path))
            families[name] = kind
    del hf
    release(engine.device)
    return families


class RssSampler:
    """The process RSS every `interval` seconds on a daemon thread: [(seconds since t0, bytes)]."""

    def __init__(self, t0: float, interval: float = 1.0):
        import psutil

        self._proc = psutil.Process()
        self.t0, self.interval = t0, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> tuple[float, int]:
        s = (time.perf_counter() - self.t0, self._proc.memory_info().rss)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


# ---- the checks ------------------------------------------------------------------------------------
def kv_state(engine) -> dict:
    """Engine thread: what is still held once idle."""
    residency = engine.residency
    prefix = [b for blocks in residency.by_kind["prefix"].prefix_blocks.values() for b in blocks]
    users = Counter(seq.adapter for seq in engine.seqs.values() if seq.adapter is not None)
    return {"seqs": len(engine.seqs), "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting), "blocks_total": engine.blocks.num_blocks,
            "blocks_free": engine.blocks.num_free, "prefix_blocks": len(prefix),
            "prefix_block_refcounts": sorted(Counter(engine.blocks.refcount(b) for b in prefix).items()),
            "adapter_users": dict(users), "adapter_pins": dict(residency.pins),
            "lora_slots_used": sum(len(s.slot_of) for s in residency.device.values()),
            "adapters": residency.names()}


def leak_failures(state: dict, unload_errors: dict[str, str], final: dict) -> list[str]:
    out = []
    if state["seqs"] or state["running"] or state["waiting"]:
        out.append(f"requests left in the engine when idle: {state['seqs']} seqs, {state['running']} running, "
                   f"{state['waiting']} waiting")
    if state["adapter_users"] or state["adapter_pins"]:
        out.append(f"adapters still used or pinned by requests: {state['adapter_users']}, pins {state['adapter_pins']}")
    expected = state["blocks_total"] - state["prefix_blocks"]
    if state["blocks_free"] != expected:
        out.append(f"KV blocks leaked: {state['blocks_free']} free after the load, expected {expected} "
                   f"({state['blocks_total']} less {state['prefix_blocks']} held by prefix adapters)")
    if any(ref != 1 for ref, _ in state["prefix_block_refcounts"]):
        out.append(f"prefix blocks still shared with requests: refcounts {state['prefix_block_refcounts']}")
    for name, err in unload_errors.items():
        out.append(f"unloading {name} failed: {err}")
    if final["blocks_free"] != final["blocks_total"]:
        out.append(f"KV blocks leaked: {final['blocks_free']} of {final['blocks_total']} free after unloading "
                   "every adapter")
    if final["adapters"] or final["lora_slots_used"]:
        out.append(f"after unloading: adapters {final['adapters']}, {final['lora_slots_used']} LoRA slots used")
    return out


# ---- the report ------------------------------------------------------------------------------------
def _ms(xs) -> dict:
    return percentiles([1000 * x for x in xs])


def rss_summary(samples: list[tuple[float, int]], duration: float) -> dict:
    warm_at = WARM_UP_FRACTION * duration
    after = [s for s in samples if s[0] >= warm_at] or samples[-1:]
    warm_t, warm = after[0]
    end_t, end = samples[-1]
    limit = warm + max(RSS_TOLERANCE[0] * warm, RSS_TOLERANCE[1])
    return {"start_mib": samples[0][1] / MiB, "after_warm_up_mib": warm / MiB, "after_warm_up_at_s": warm_t,
            "end_mib": end / MiB, "end_at_s": end_t, "max_after_warm_up_mib": max(s[1] for s in after) / MiB,
            "limit_mib": limit / MiB, "flat": end <= limit,
            "series": [[round(t, 2), round(b / MiB, 1)] for t, b in samples]}


def summarize(records: list[Record], wall: float, families: dict[str, str]) -> dict:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    tpot = [(r.end_s - r.sent_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1 and r.ttft_s is not None]
    errors = Counter(r.error for r in records if r.error is not None)
    return {"requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
            "error_kinds": dict(errors.most_common(10)), "wall_s": wall,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_ms": _ms([r.ttft_s for r in ok if r.ttft_s is not None]), "tpot_ms": _ms(tpot),
            "e2e_ms": _ms([r.end_s - r.sent_s for r in ok]),
            "per_family": dict(sorted(Counter(families.get(r.model, BASE) for r in records).items())),
            "per_adapter": dict(sorted(Counter(r.model for r in records).items()))}


def print_table(res: dict) -> None:
    mix = ", ".join(f"{n} {k}" for k, n in PLAN.items())
    print(f"load: {res['clients']} clients x {res['duration']:g} s over {sum(PLAN.values())} adapters ({mix}) "
          f"+ base, max_tokens {res['max_tokens']}")
    print(f"requests {res['requests']}  completed {res['completed']}  errors {res['errors']}  "
          f"wall {res['wall_s']:.1f} s")
    print(f"throughput {res['requests_per_s']:.2f} req/s   {res['output_tokens_per_s']:.1f} output tok/s")
    print_latency(res, (("ttft_ms", "TTFT"), ("tpot_ms", "per token"), ("e2e_ms", "end-to-end")))
    rss = res["rss"]
    print(f"RSS MiB: start {rss['start_mib']:.0f}, after warm-up ({rss['after_warm_up_at_s']:.0f} s) "
          f"{rss['after_warm_up_mib']:.0f}, end {rss['end_mib']:.0f}, max {rss['max_after_warm_up_mib']:.0f} "
          f"(limit {rss['limit_mib']:.0f}): {'flat' if rss['flat'] else 'GROWING'}")
    kv = res["kv_after_load"]
    print(f"KV blocks: {kv['blocks_free']}/{kv['blocks_total']} free when idle ({kv['prefix_blocks']} held by "
          f"prefix adapters); {res['blocks_free_after']}/{kv['blocks_total']} after unloading every adapter")
    print(f"reference: {res['reference_checked']} requests re-run alone, {res['reference_mismatches']} mismatches")
    print("requests per family: " + ", ".join(f"{k} {v}" for k, v in res["per_family"].items()))
    for f in res["failures"]:
        print("FAILED:", f)
    print("load test", "passed" if not res["failures"] else "FAILED", flush=True)


# ---- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench load")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (closed loop)")
    ap.add_argument("--duration", type=float, default=240.0, help="seconds during which clients send requests")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--max-tokens", type=int, default=32, help="each request asks for [max/2, max] tokens")
    ap.add_argument("--reference-sample", type=int, default=16, help="requests re-run alone and compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--virtual-tokens", type=int, default=8, help="of the prompt-learning adapters")
    ap.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache size (default: the engine's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1:
        ap.error("--clients, --duration and --max-tokens must be positive")

    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    config = EngineConfig(model=args.model, num_threads=args.threads, device=args.device, dtype=args.dtype,
                          max_loras=max(8, PLAN["lora"]),
                          max_lora_rank=args.rank, max_num_seqs=max(64, args.clients),
                          **({"kv_cache_memory_mb": args.kv_cache_mb} if args.kv_cache_mb else {}))
    engine = LLMEngine(config)
    prompts = [make_prompt(i, n) for i, n in enumerate(PROMPT_TOKENS)]
    with tempfile.TemporaryDirectory() as tmp:
        families = build_adapters(engine, Path(tmp), args.rank, args.virtual_tokens)
    models = [BASE, *families]
    base_name = engine.model_name
    failures: list[str] = []

    with LoopbackServer(AsyncEngine(engine, Metrics())) as srv:
        from quiver.bench.serving import warm_up
        warm_up(srv.url)
        srv.wait_idle()
        print(f"load: {args.clients} clients for {args.duration:g} s against {srv.url} ...", flush=True)
        t_start = time.perf_counter()
        with RssSampler(t_start) as rss:
            records = asyncio.run(run_load(srv.url, base_name, models, prompts, args, t_start))
        wall = max((r.end_s for r in records), default=time.perf_counter() - t_start)
        srv.wait_idle()
        kv_after_load = srv.on_engine(kv_state)

        sample = pick_reference(records, args.reference_sample, random.Random(args.seed))
        reference = asyncio.run(run_reference(srv.url, base_name, prompts, sample))
        srv.wait_idle()

        unload_errors: dict[str, str] = {}
        for name in families:
            try:
                asyncio.run(srv.async_engine.unload_adapter(name))
            except Exception as exc:  # noqa: BLE001 - AdapterInUse above all: a pinned adapter is a leak
                unload_errors[name] = f"{type(exc).__name__}: {exc}"
        kv_final = srv.on_engine(kv_state)

    summary = summarize(records, wall, families)
    rss_info = rss_summary(rss.samples, args.duration)
    mismatches = [row for row in reference if not row["match"]]
    if summary["errors"]:
        failures.append(f"{summary['errors']} of {summary['requests']} requests failed: {summary['error_kinds']}")
    if not summary["completed"]:
        failures.append("no request completed")
    failures += leak_failures(kv_after_load, unload_errors, kv_final)
    if mismatches:
        worst = min(mismatches, key=lambda row: row["tokens_agreed"])
        failures.append(f"{len(mismatches)} of {len(reference)} reference outputs differ from the load's "
                        f"(fewest tokens agreed: {worst['tokens_agreed']} of {worst['max_tokens']}, {worst['model']})")
    if not rss_info["flat"]:
        failures.append(f"RSS grew from {rss_info['after_warm_up_mib']:.0f} MiB after warm-up to "
                        f"{rss_info['end_mib']:.0f} MiB (limit {rss_info['limit_mib']:.0f})")

    result = {"benchmark": "load", "model": engine.model_name, "device": args.device,
              "dtype": dtype_name(engine.dtype), "clients": args.clients, "duration": args.duration,
              "max_tokens": args.max_tokens, "seed": args.seed, "adapters": families,
              "prompts": prompts, "machine": machine(), **cuda_peak(engine.device), **summary,
              "rss_mib": {"after_warm_up": rss_info["after_warm_up_mib"], "end": rss_info["end_mib"]},
              "rss_flat": rss_info["flat"], "rss": rss_info,
              "kv_after_load": kv_after_load, "kv_after_unload": kv_final, "unload_errors": unload_errors,
              "blocks_free_after": kv_final["blocks_free"], "blocks_total": kv_final["blocks_total"],
              "reference_checked": len(reference), "reference_mismatches": len(mismatches),
              "reference_models": sorted({row["model"] for row in reference}), "reference": reference,
              "failures": failures, "passed": not failures,
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "requests_sample": [asdict(r) for r in records[:20]]}
    print_table(result)
    print("wrote", write_json("load", result, args.out), flush=True)
    if failures:
        raise AssertionError("load test failed:\n  " + "\n  ".join(failures))
    return result
