"""Decode tokens/s of each supported architecture, Quiver against transformers' own `generate`, in one run
on one machine: a random model of each architecture's small shape (bench.models.ARCH_SHAPES), the same
prompts (random token ids, all of one length, so neither side pads) through both, greedy, the base model.

Decode rate is measured past the prefill on both sides, batch·(N - 1) tokens from the moment every row has its
first token to the end: Quiver's from the step that gives it, transformers' from its first logits processor call.

    quiver bench archs [--archs qwen3 gemma2 ...] [--batch 8] [--prompt-tokens 32] [--new-tokens 32]
                       [--repeats 2] [--threads N] [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from quiver.bench.common import (add_device_args, add_out_arg, dtype_name, machine, release, results_dir,
                                 synchronize, write_json)
from quiver.bench.models import ARCH_SHAPES, bench_model


def quiver_decode(engine, ids: list[list[int]], new_tokens: int) -> float:
    from quiver.server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in ids]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    synchronize(engine.device)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    synchronize(engine.device)
    return len(ids) * (new_tokens - 1) / (time.perf_counter() - t0)


def transformers_decode(model, ids: torch.Tensor, new_tokens: int) -> float:
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        """Called after each forward: the first call is the end of the prefill."""
        start = None

        def __call__(self, input_ids, scores):
            if self.start is None:
                synchronize(model.device)
                self.start = time.perf_counter()
            return scores

    mark = FirstToken()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([mark]))
    synchronize(model.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return ids.shape[0] * (new_tokens - 1) / (time.perf_counter() - mark.start)


def measure(arch: str, root: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    path = bench_model(arch, root)
    engine = LLMEngine(EngineConfig(model=path, num_threads=args.threads, device=args.device, dtype=args.dtype,
                                    max_num_seqs=max(64, args.batch)))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=engine.dtype).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.prompt_tokens), generator=g)
    quiver_decode(engine, ids[:2].tolist(), 3)  # warm-ups
    transformers_decode(hf, ids[:2].to(args.device), 3)
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternating, so both see the same drift in the machine's load
        ours.append(quiver_decode(engine, ids.tolist(), args.new_tokens))
        theirs.append(transformers_decode(hf, ids.to(args.device), args.new_tokens))
    row = {"arch": arch, "dtype": dtype_name(engine.dtype), "quiver_decode_tokens_per_s": statistics.median(ours),
           "transformers_decode_tokens_per_s": statistics.median(theirs), "quiver_rounds": ours,
           "transformers_rounds": theirs}
    row["ratio"] = row["quiver_decode_tokens_per_s"] / row["transformers_decode_tokens_per_s"]
    del engine, hf
    release(args.device)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench archs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", choices=list(ARCH_SHAPES), default=list(ARCH_SHAPES),
                    help="model types to measure (default: every supported one)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="rounds per side (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for arch in args.archs:
            row = measure(arch, root, args)
            rows.append(row)
            print(f"{arch:12s} {row['dtype']:9s} quiver {row['quiver_decode_tokens_per_s']:8.1f} tok/s   "
                  f"transformers {row['transformers_decode_tokens_per_s']:8.1f} tok/s   {row['ratio']:5.2f}x",
                  flush=True)
    result = {"benchmark": "archs", "device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "machine": machine(), "rows": rows}
    print("wrote", write_json("archs", result, results_dir(args.out)))
    return result
