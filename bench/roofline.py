"""How far a step is from the machine's limit: achieved GFLOP/s of decode and prefill steps next to the
measured peak of one large matmul in the same dtype, and the share of step time spent in projection
matmuls (and in attention's batched ones).

Peak: the best of --peak-repeats [2048 x 2048] @ [2048 x 2048] matmuls (2·n³ FLOPs each), torch's or
the engine's prepacked oneDNN one, whichever is faster. A step's FLOPs: 2 · (projection and LM-head
parameters) per token it computes, plus attention's 4 · heads · head_dim · context per token. The shares come from torch's profiler over a second, profiled run of the
same decode: aten::mm, addmm and the prepacked mkldnn linear (the projections and the LM head), bmm
and baddbmm (attention).

    quiver bench roofline [--batches 32 64] [--prompt-tokens 128] [--model DIR] [--threads N] [--device ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from quiver.bench.common import (add_device_args, add_out_arg, decode_step_ms, dtype_name, machine, synchronize,
                                 write_json)

PROJECTION_OPS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")  # the projections and the LM head
BATCHED_OPS = ("aten::bmm", "aten::baddbmm")  # attention (decode) and LoRA


def matmul_peak(dtype: torch.dtype, device, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of the best [n, n] @ [n, n] product: torch's matmul, or on the CPU the engine's own
    prepacked oneDNN linear when it is faster (server.model.packed)."""
    from quiver.server.model.packed import PackedWeight, can_pack

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    products = [lambda: a @ b]
    if can_pack(torch.device(device), dtype):
        packed = PackedWeight(b)
        products.append(lambda: packed.linear(a, None))
    best = float("inf")
    for product in products:
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            product()
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def flops_per_token(mc, context: int) -> float:
    h, d, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    proj = h * (mc.num_heads + 2 * mc.num_kv_heads) * d + mc.num_heads * d * h + 3 * h * inter
    return 2 * (mc.num_layers * proj + mc.vocab_size * h) + mc.num_layers * 4 * mc.num_heads * d * context


def profiled(fn) -> tuple[object, float, float]:
    """fn()'s result and the shares of its CPU time spent in projection matmuls and in batched ones."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = [sum(e.self_cpu_time_total for e in events if e.key in ops) / (total or 1)
             for ops in (PROJECTION_OPS, BATCHED_OPS)]
    return out, *share


def main(argv: list[str] | None = None) -> dict:
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.sampling import SamplingParams

    ap = argparse.ArgumentParser(prog="quiver bench roofline")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--peak-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                                    max_num_seqs=max(args.batches), max_num_batched_tokens=8192))
    mc = engine.model_config
    peak = matmul_peak(engine.dtype, engine.device, args.peak_repeats)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    result = {"machine": machine(), "dtype": dtype_name(engine.dtype), "matmul_peak_gflops": peak, "steps": {}}
    print(f"matmul peak ({dtype_name(engine.dtype)}, 2048^3): {peak:.0f} GFLOP/s")
    for b in args.batches:
        decode_step_ms(engine, 1, 8, lambda i: params, seed=0)  # warm-up
        ms = statistics.median(decode_step_ms(engine, b, args.prompt_tokens, lambda i: params, seed=b))
        _, mm_share, bmm_share = profiled(lambda: decode_step_ms(engine, b, args.prompt_tokens, lambda i: params,
                                                                 seed=b + 1))
        gflops = b * flops_per_token(mc, args.prompt_tokens + args.new_tokens // 2) / ms / 1e6
        g = torch.Generator().manual_seed(10_000 + b)  # prompts the prefix cache has not seen
        for _ in range(b):
            engine.add_request(torch.randint(100, 20000, (args.prompt_tokens,), generator=g).tolist(),
                               SamplingParams(max_tokens=1, temperature=0))
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.step()  # every prompt in one prefill step
        synchronize(engine.device)
        prefill_ms = (time.perf_counter() - t0) * 1000
        while engine.has_work():
            engine.step()
        prefill = b * args.prompt_tokens * flops_per_token(mc, args.prompt_tokens // 2) / prefill_ms / 1e6
        result["steps"][b] = {"decode_ms": ms, "decode_gflops": gflops, "decode_share_of_peak": gflops / peak,
                              "decode_projection_share": mm_share, "decode_batched_matmul_share": bmm_share,
                              "prefill_ms": prefill_ms, "prefill_gflops": prefill,
                              "prefill_share_of_peak": prefill / peak}
        print(f"batch {b:3d}: decode {ms:6.1f} ms/step {gflops:6.1f} GFLOP/s ({gflops / peak:.0%} of peak, "
              f"{mm_share:.0%} of its time in projection matmuls, {bmm_share:.0%} in attention's)   "
              f"prefill of {b}x{args.prompt_tokens} tokens "
              f"{prefill_ms:7.0f} ms {prefill:6.1f} GFLOP/s ({prefill / peak:.0%} of peak)", flush=True)
    path = write_json("roofline", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
