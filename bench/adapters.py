"""Throughput with 1..32 distinct LoRA adapters in a batch of 32 requests (rank 16, all seven
projections), against Quiver's own base-only throughput and PEFT's mixed-batch
`generate(adapter_names=...)`, in one process and one run, with one thread count.

    quiver bench adapters [--adapters 1 2 4 8 16 32] [--batch 32] [--new-tokens 64] [--rank 16]
                          [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from quiver.bench.common import add_device_args, add_out_arg, cuda_peak, dtype_name, machine, results_dir, write_json
from quiver.bench.plot import line_plot
from quiver.bench.throughput import prompts, run_quiver, run_transformers

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(hf, root: Path, n: int, rank: int | tuple[int, ...]) -> list[Path]:
    """n PEFT LoRA adapters on all seven projections with random non-zero weights, saved with
    save_pretrained; adapter i of rank[i % len(rank)] when rank is a tuple."""
    from peft import LoraConfig, get_peft_model

    ranks = (rank,) if isinstance(rank, int) else rank
    paths = []
    for i in range(n):
        rank = ranks[i % len(ranks)]
        torch.manual_seed(1000 + i)
        # every projection: the seven of Llama-like bases, Phi-3's four fused ones
        model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.02)
        model.save_pretrained(root / f"adapter{i}")
        model.unload()
        paths.append(root / f"adapter{i}")
    return paths


def quiver_and_peft(args, root: Path, n: int, with_peft: bool = True):
    """Quiver's engine and PEFT's model (or None) holding the same n random adapters adapter0..,
    with one thread count, on args.device in the engine's dtype: (engine, tokenizer, peft, names)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, device=args.device,
                                    dtype=args.dtype, max_loras=n, max_lora_rank=args.rank,
                                    max_num_seqs=max(64, args.batch)))
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(args.device).eval()
    paths = make_adapters(hf, root, n, args.rank)
    names = [p.name for p in paths]
    for name, path in zip(names, paths):
        engine.load_adapter(name, str(path))
    peft = None
    if with_peft:
        peft = PeftModel.from_pretrained(hf, paths[0], adapter_name=names[0]).eval()
        for name, path in zip(names[1:], paths[1:]):
            peft.load_adapter(path, adapter_name=name)
    return engine, tokenizer, peft, names


def describe(name: str, args, engine, threads: int) -> dict:
    """The fields every multi-adapter benchmark's JSON starts with (with the CUDA peak so far)."""
    return {"benchmark": name, "model": engine.model_name, "device": args.device,
            "dtype": dtype_name(engine.dtype), "threads": threads, "batch": args.batch,
            "new_tokens": args.new_tokens, "rank": args.rank, "targets": ALL7, "machine": machine(),
            **cuda_peak(engine.device)}


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: all cores)")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    add_device_args(ap)  # for Quiver and PEFT alike
    add_out_arg(ap)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench adapters")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed-batch generate")
    add_common_args(ap)
    args = ap.parse_args(argv)

    texts = prompts(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        engine, tokenizer, peft, names = quiver_and_peft(args, Path(tmp), max(args.adapters), not args.no_peft)
        threads = torch.get_num_threads()
        run_quiver(engine, tokenizer, texts, 4, [names[i % len(names)] for i in range(args.batch)])  # warm-up
        rows = []
        for k in args.adapters:
            mix = [names[i % k] for i in range(args.batch)]
            # base-only runs right before and after each mixed run: the ratio compares neighbours
            before = run_quiver(engine, tokenizer, texts, args.new_tokens)
            q = run_quiver(engine, tokenizer, texts, args.new_tokens, mix)
            base = (before + run_quiver(engine, tokenizer, texts, args.new_tokens)) / 2
            row = {"distinct_adapters": k, "quiver_tokens_per_s": q, "quiver_base_tokens_per_s": base,
                   "quiver_vs_base": q / base}
            line = f"{k:3d} adapters: quiver {q:8.1f} tok/s, base-only {base:8.1f} ({q / base:4.2f}x base)"
            if peft is not None:
                p = run_transformers(peft, tokenizer, texts, args.new_tokens, adapter_names=mix)
                row.update(peft_tokens_per_s=p, quiver_vs_peft=q / p)
                line += f"   peft mixed-batch {p:8.1f} tok/s   quiver/peft {q / p:5.2f}x"
            rows.append(row)
            print(line, flush=True)
    result = describe("adapters", args, engine, threads) | {"rows": rows}
    out_dir = results_dir(args.out)
    series = {"Quiver": [r["quiver_tokens_per_s"] for r in rows],
              "Quiver, base model only": [r["quiver_base_tokens_per_s"] for r in rows]}
    if peft is not None:
        series["PEFT mixed-batch generate"] = [r["peft_tokens_per_s"] for r in rows]
    result["plot"] = str(line_plot(out_dir / "adapters.png", args.adapters, series, "distinct adapters in the batch",
                                   "output tokens/s", f"batch {args.batch}, LoRA r={args.rank} on 7 projections, "
                                   f"{threads} threads"))
    print("wrote", write_json("adapters", result, out_dir), "and", result["plot"])
    return result
