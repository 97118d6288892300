"""Latency of one adapter served merged (`quiver merge`), unmerged (a LoRA slot) and of the bare
base model: time to first token (TTFT), time per output token (TPOT, per request) and
inter-token latency (ITL, per token) at 1, 8 and 32 concurrent requests (prompt 128 tokens, 128
new tokens), median and p90 over every request of every repeat (at concurrency c < 4, 4 // c
rounds per repeat), all three variants in turn in one process, one run, one thread count.

    quiver bench latency [--concurrency 1 8 32] [--repeats 3] [--rank 16] [--threads N]
                         [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quiver.server.engine.config import EngineConfig

from quiver.bench.adapters import ALL7, make_adapters
from quiver.bench.common import (add_device_args, add_out_arg, cuda_peak, dtype_name, machine, release, results_dir,
                                 write_json)
from quiver.bench.plot import line_plots
from quiver.bench.throughput import prompts

VARIANTS = ("base", "merged", "unmerged")


def prompt_ids(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens."""
    out = []
    for text in prompts(n):
        ids = tokenizer(text).input_ids
        while len(ids) < length:
            ids += tokenizer(" " + text).input_ids
        out.append(ids[:length])
    return out


def run_once(engine, ids: list[list[int]], new_tokens: int, adapter: str | None) -> dict[str, list[float]]:
    """All requests arrive together. Per request: TTFT and TPOT (mean time per output token after
    the first); per token after the first: ITL (its gap to the previous one)."""
    from quiver.server.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    for i, p in enumerate(ids):
        engine.add_request(p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                           adapter=adapter, request_id=f"r{i}")
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            times.setdefault(out.request_id, []).append(now)
    return {"ttft": [t[0] - t0 for t in times.values()],
            "tpot": [(t[-1] - t[0]) / (len(t) - 1) for t in times.values()],
            "itl": [b - a for t in times.values() for a, b in zip(t, t[1:])]}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench latency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    add_device_args(ap)  # of the engines and the merged model
    add_out_arg(ap)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quiver.server.engine.device import resolve_dtype
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.merge import merge_adapters
    from quiver.server.model.checkpoint import resolve_model

    model_dir, model_name = resolve_model(args.model)
    dtype = resolve_dtype(args.dtype, torch.device(args.device), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = {(v, c): {"ttft": [], "tpot": [], "itl": []} for v in VARIANTS for c in args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
        (adapter,) = make_adapters(hf, Path(tmp), 1, args.rank)
        del hf
        release(args.device)  # the engines load their own copies
        merged_dir = merge_adapters(model_dir, [(adapter, 1.0)], Path(tmp) / "merged", dtype)

        def engine(model):
            return LLMEngine(EngineConfig(model=str(model), num_threads=args.threads, device=args.device,
                                          dtype=args.dtype, max_loras=1, gpu_memory_utilization=0.4,  # 2 engines
                                          max_lora_rank=args.rank, max_num_seqs=max(64, max(args.concurrency))),
                             tokenizer=tokenizer)

        base, merged = engine(model_dir), engine(merged_dir)
        assert base.dtype == merged.dtype == dtype, (base.dtype, merged.dtype, dtype)
        base.load_adapter("adapter", str(adapter))
        runs = {"base": (base, None), "merged": (merged, None), "unmerged": (base, "adapter")}
        warm = prompt_ids(tokenizer, max(args.concurrency), args.prompt_tokens)
        for eng, name in runs.values():  # at full size: the first big step of an engine pays for its memory
            run_once(eng, warm, 2, name)
        for r in range(args.repeats):
            for c in args.concurrency:
                ids = prompt_ids(tokenizer, c, args.prompt_tokens)
                order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # no variant always goes first
                for _ in range(max(1, 4 // c)):  # a few more samples where a run has few requests
                    for v in order:
                        eng, name = runs[v]
                        for key, values in run_once(eng, ids, args.new_tokens, name).items():
                            samples[(v, c)][key] += values
                print(f"repeat {r + 1}/{args.repeats}, concurrency {c} done", flush=True)
    threads = torch.get_num_threads()
    rows = []
    for c in args.concurrency:
        row = {"concurrency": c}
        for v in VARIANTS:
            s = samples[(v, c)]
            row[v] = {f"{k}_{stat}_ms": 1e3 * f(s[k]) for k in ("ttft", "tpot", "itl")
                      for stat, f in (("median", statistics.median), ("p90", lambda x: percentile(x, .9)))}
            row[v]["decode_tokens_per_s"] = 1e3 * c / row[v]["tpot_median_ms"]
        for v in ("unmerged", "base"):
            for k in ("tpot", "itl", "ttft"):
                row[f"{v}_vs_merged_{k}"] = row[v][f"{k}_median_ms"] / row["merged"][f"{k}_median_ms"]
        rows.append(row)
    heads = " ".join(f"{k:>8} {p}" for k in ("TTFT", "TPOT", "ITL") for p in ("p50", "p90"))
    print(f"{'conc':>4} {'variant':9} {heads}   (ms)")
    for row in rows:
        for v in VARIANTS:
            print(f"{row['concurrency']:4d} {v:9} " + " ".join(f"{row[v][f'{k}_{p}_ms']:12.2f}" for k in
                                                               ("ttft", "tpot", "itl") for p in ("median", "p90")))
        print("     unmerged / merged: " + ", ".join(f"{k.upper()} {row[f'unmerged_vs_merged_{k}']:.3f}x"
                                                     for k in ("tpot", "itl", "ttft"))
              + f";  base / merged: TPOT {row['base_vs_merged_tpot']:.3f}x")
    result = {"benchmark": "latency", "model": model_name, "device": args.device, "dtype": dtype_name(dtype),
              "threads": threads, **cuda_peak(args.device),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "rank": args.rank, "targets": ALL7, "machine": machine(), "rows": rows}
    out_dir = results_dir(args.out)
    conc = [r["concurrency"] for r in rows]
    result["plot"] = str(line_plots(out_dir / "latency.png", conc, "concurrent requests", [
        ("time per output token", "ms (median)", {v: [r[v]["tpot_median_ms"] for r in rows] for v in VARIANTS}),
        ("time to first token", "ms (median)", {v: [r[v]["ttft_median_ms"] for r in rows] for v in VARIANTS})],
        f"one LoRA r={args.rank} on 7 projections: merged vs unmerged vs base, {threads} threads"))
    print("wrote", write_json("latency", result, out_dir), "and", result["plot"])
    return result
