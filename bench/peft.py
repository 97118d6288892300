"""Quiver against HF PEFT on multi-adapter batches: `batch` requests where row i uses LoRA adapter
i % k (rank 16, all seven projections), for each count k of distinct adapters. Output tokens/s of
Quiver's engine (all rows in one continuous batch), of PEFT's mixed-batch
`generate(adapter_names=...)` on one batch, and of PEFT the usual way (rows grouped by adapter,
`set_adapter` then one batched `generate` per group, one group after another; total tokens over
total time), in one process and one run, with one thread count.

    quiver bench peft [--adapters 1 8] [--batch 32] [--new-tokens 64] [--rank 16] [--threads N]
                      [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from quiver.bench.adapters import add_common_args, describe, quiver_and_peft
from quiver.bench.common import results_dir, write_json
from quiver.bench.plot import line_plot
from quiver.bench.throughput import prompts, run_quiver, run_transformers


def run_peft_per_adapter(peft, tokenizer, texts: list[str], new_tokens: int, mix: list[str]) -> float:
    """Rows grouped by adapter; `set_adapter` then one batched generate per group, sequentially."""
    groups: dict[str, list[str]] = {}
    for text, name in zip(texts, mix):
        groups.setdefault(name, []).append(text)
    t0 = time.perf_counter()
    for name, group in groups.items():
        peft.set_adapter(name)
        run_transformers(peft, tokenizer, group, new_tokens)  # asserts every row made new_tokens tokens
    elapsed = time.perf_counter() - t0
    return len(texts) * new_tokens / elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench peft")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8], help="distinct adapter counts")
    add_common_args(ap)
    args = ap.parse_args(argv)

    texts = prompts(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        engine, tokenizer, peft, names = quiver_and_peft(args, Path(tmp), max(args.adapters))
        threads = torch.get_num_threads()
        # warm-up of every path at full batch size (a first big batch pays for its memory)
        warm_names = [names[i % len(names)] for i in range(args.batch)]
        run_quiver(engine, tokenizer, texts, 4, warm_names)
        run_transformers(peft, tokenizer, texts, 4, adapter_names=warm_names)
        run_peft_per_adapter(peft, tokenizer, texts, 4, warm_names)
        rows = []
        print(f"{'adapters':>8}  {'quiver':>9}  {'peft mixed':>10}  {'peft per-adapter':>16}  "
              f"{'vs mixed':>8}  {'vs per-adapter':>14}   (output tokens/s)", flush=True)
        for k in args.adapters:
            mix = [names[i % k] for i in range(args.batch)]
            q = run_quiver(engine, tokenizer, texts, args.new_tokens, mix)
            mixed = run_transformers(peft, tokenizer, texts, args.new_tokens, adapter_names=mix)
            per = run_peft_per_adapter(peft, tokenizer, texts, args.new_tokens, mix)
            rows.append({"distinct_adapters": k, "quiver_tokens_per_s": q, "peft_mixed_tokens_per_s": mixed,
                         "peft_per_adapter_tokens_per_s": per, "quiver_vs_peft_mixed": q / mixed,
                         "quiver_vs_peft_per_adapter": q / per})
            print(f"{k:8d}  {q:9.1f}  {mixed:10.1f}  {per:16.1f}  {q / mixed:7.2f}x  {q / per:13.2f}x", flush=True)
    result = describe("peft", args, engine, threads) | {"rows": rows}
    out_dir = results_dir(args.out)
    series = {"Quiver, one continuous batch": [r["quiver_tokens_per_s"] for r in rows],
              "PEFT mixed-batch generate(adapter_names=...)": [r["peft_mixed_tokens_per_s"] for r in rows],
              "PEFT set_adapter + generate per adapter": [r["peft_per_adapter_tokens_per_s"] for r in rows]}
    result["plot"] = str(line_plot(out_dir / "peft.png", args.adapters, series, "distinct adapters in the batch",
                                   "output tokens/s", f"Quiver vs PEFT: batch {args.batch}, LoRA r={args.rank} "
                                   f"on 7 projections, {threads} threads"))
    print("wrote", write_json("peft", result, out_dir), "and", result["plot"])
    return result
