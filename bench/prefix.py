"""Prefix caching: time to first token of chat requests that share a long system prompt, with the cache
on and off, side by side in one run.

A chat of --prefix-tokens system-prompt tokens (SmolLM2's template) is sent with one question; then
--repeats more requests send the same system prompt with other questions, alone each, on the base and
on a LoRA adapter (whose cached blocks are its own). Reported: each TTFT, and the repeats' median over
the first's, with the cache on and with --no-prefix-caching.

    quiver bench prefix [--prefix-tokens 1000] [--repeats 5] [--model DIR] [--threads N] [--device ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from quiver.bench.common import add_device_args, add_out_arg, machine, write_json

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "How many legs has a spider?",
             "What colour is the sky?", "Say hello.", "What is two plus two?", "Name a river.", "Spell cat."]


def ttft(engine, ids: list[int], adapter: str | None) -> tuple[float, int]:
    from quiver.server.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    seq = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), adapter=adapter)
    while engine.has_work():
        engine.step()
    return time.perf_counter() - t0, seq.num_cached_tokens


def main(argv: list[str] | None = None) -> dict:
    from quiver.bench.load import build_adapters
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    ap = argparse.ArgumentParser(prog="quiver bench prefix")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    result = {"machine": machine(), "prefix_tokens": args.prefix_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as adapter_dir:
        for caching in (True, False):
            engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                            num_threads=args.threads, enable_prefix_caching=caching,
                                            max_model_len=max(2048, 2 * args.prefix_tokens)))
            lora = sorted(n for n in build_adapters(engine, Path(adapter_dir) / f"cache-{caching}", rank=8, virtual=4) if n.startswith("lora"))[0]
            tok = engine.tokenizer
            words = " ".join(f"rule {i}: answer politely and briefly." for i in range(args.prefix_tokens))
            system = tok.decode(tok(words).input_ids[:args.prefix_tokens])
            for adapter in (None, lora):
                times = []
                for q in QUESTIONS[:args.repeats + 1]:
                    ids = tok.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": q}], add_generation_prompt=True)
                    ids = ids if isinstance(ids, list) else ids["input_ids"]
                    times.append(ttft(engine, ids, adapter))
                first, rest = times[0][0], statistics.median(t for t, _ in times[1:])
                name = f"{'cache' if caching else 'no-cache'}/{adapter or 'base'}"
                result["runs"][name] = {"first_s": first, "repeat_median_s": rest, "ratio": rest / first,
                                        "prompt_tokens": len(ids), "cached_tokens": [c for _, c in times]}
                print(f"{name:22s} first {first * 1000:7.0f} ms   repeats {rest * 1000:7.0f} ms   "
                      f"ratio {rest / first:.2f}   cached tokens {[c for _, c in times]}", flush=True)
            del engine
    path = write_json("prefix", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
