"""The base kept 4-bit (NF4, QLoRA's) against the same base in full precision: what its weights hold in
memory, and decode speed at batch 1, 8 and 32, side by side in one run. Three engines: full precision,
4-bit projections (exact to bitsandbytes), and 4-bit projections with the embedding table 4-bit too
(--quantize-embeddings).

Memory: each engine is loaded in a fresh process with the same KV cache; reported are the engine's own
count of its weight bytes and the process's resident set after load minus before (libraries imported
first, malloc_trim after, so that the fp32 tensors a quantize-at-load reads and frees are not counted). Speed: both engines live
in this process and take turns, batch by batch, over --rounds rounds; reported is the median
decode-step time and tokens per second of each.

    quiver bench quantized [--quantization nf4] [--batches 1 8 32] [--rounds 3] [--model DIR] [--device ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


from quiver.bench.common import add_device_args, add_out_arg, decode_step_ms, dtype_name, machine, write_json

KV_MB = 256


def engine(model, kind: dict, device="cpu", dtype="auto", threads=None):
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, kv_cache_memory_mb=KV_MB, device=device, dtype=dtype, num_threads=threads,
                                  max_model_len=2048, **kind))


def memory_child(model, kind: dict, device, dtype) -> None:
    """Run in a fresh process: print the weights' bytes and the resident set the load added."""
    import ctypes
    import gc

    import psutil

    proc = psutil.Process()
    import quiver.server.engine.llm_engine  # noqa: F401 - imports are not the model's memory
    if kind:
        import bitsandbytes  # noqa: F401 - nor is the quantizer's library
    before = proc.memory_info().rss
    e = engine(model, kind, device, dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = proc.memory_info().rss
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in e.runner.kv_caches)
    print(json.dumps({"weight_bytes": e.weight_bytes(), "rss_added": after - before, "kv_bytes": kv}))


def memory(model, kind: dict, device, dtype) -> dict:
    code = f"from quiver.bench.quantized import memory_child; memory_child({model!r}, {kind!r}, {device!r}, {dtype!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def decode_steps(e, batch: int, prompt_tokens: int, new_tokens: int, seed: int) -> list[float]:
    from quiver.server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return decode_step_ms(e, batch, prompt_tokens, lambda i: params, seed)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench quantized")
    ap.add_argument("--model", default=None, help="an unquantized base (default: the embedded SmolLM2)")
    ap.add_argument("--quantization", choices=["nf4", "fp4"], default="nf4")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    q4 = args.quantization
    kinds = {"full": {}, q4: {"quantization": q4}, f"{q4}+embeddings": {"quantization": q4, "quantize_embeddings": True}}
    mem = {name: memory(args.model, q, args.device, args.dtype) for name, q in kinds.items()}
    engines = {name: engine(args.model, q, args.device, args.dtype, args.threads) for name, q in kinds.items()}
    steps = {(name, b): [] for name in kinds for b in args.batches}
    for r in range(args.rounds):
        for b in args.batches:
            for name in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):  # alternate who goes first
                steps[name, b] += decode_steps(engines[name], b, args.prompt_tokens, args.new_tokens, seed=r)
    result = {"machine": machine(), "device": args.device, "dtype": dtype_name(engines["full"].dtype),
              "quantization": args.quantization, "kv_cache_mb": KV_MB, "memory": mem,
              "weights_shrink": {k: mem["full"]["weight_bytes"] / mem[k]["weight_bytes"] for k in kinds},
              "rss_shrink": {k: mem["full"]["rss_added"] / mem[k]["rss_added"] for k in kinds},
              "decode": {f"{name}@{b}": {"step_ms_median": statistics.median(v),
                                         "tok_s": b * 1000 / statistics.median(v)} for (name, b), v in steps.items()}}
    for name, m in mem.items():
        print(f"{name:15s} weights {m['weight_bytes'] / 2**20:6.1f} MiB ({result['weights_shrink'][name]:.2f}x less)"
              f"   resident set added by the load {m['rss_added'] / 2**20:6.1f} MiB, KV cache "
              f"{m['kv_bytes'] / 2**20:.0f} MiB of it ({result['rss_shrink'][name]:.2f}x less)")
    for b in args.batches:
        full = result["decode"][f"full@{b}"]["tok_s"]
        print(f"batch {b:3d}: " + "   ".join(f"{k} {result['decode'][f'{k}@{b}']['tok_s']:6.1f} tok/s "
                                              f"({result['decode'][f'{k}@{b}']['tok_s'] / full:.2f}x)" for k in kinds))
    path = write_json("quantized", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
