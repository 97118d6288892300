"""The Triton kernels against the torch ops and a per-adapter loop, on a GPU: microseconds per call and the
bandwidth each reaches (bytes of weights, activations and KV read and written, per second).

  lora      one fused q/k/v projection's LoRA delta (Llama-8B sizes: 4096 -> 6144, three slices) for a
            decode step (one token per row, every row its own adapter or a few shared) and a prefill
            step (long segments), in bf16: Triton SGMV/BGMV, TorchOps (padded bmm / segments), and a
            Python loop doing x[rows] @ A^T @ B per adapter.
  attention paged decode attention (GQA 32/8, head size 128) over contexts of 1-8k tokens: the Triton
            kernel against TorchOps' fused SDPA.

    quiver bench kernels [--device cuda] [--dtype bfloat16] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from quiver.bench.common import add_out_arg, machine, write_json
from quiver.kernels import torch_ops

LORA_CASES = {  # name -> (tokens per adapter segment, adapters)
    "decode 32 rows, 32 adapters": ([1] * 32, 32),
    "decode 32 rows, 8 adapters": ([4] * 8, 8),
    "decode 256 rows, 32 adapters": ([8] * 32, 32),
    "prefill 2048 + 31 decode rows": ([2048] + [1] * 31, 32),
}
ATTENTION_CASES = {"decode 32 rows x 1k": (32, 1024), "decode 32 rows x 8k": (32, 8192), "decode 256 rows x 2k": (256, 2048)}


def timed_us(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def lora_case(segments, adapters, dtype, device, rank, repeats):
    from quiver.kernels import lora_triton
    from quiver.kernels.ops import TorchOps, TritonOps
    from quiver.server.engine.upload import StepUpload

    hidden, outs = 4096, [4096, 1024, 1024]
    offsets = tuple(sum(outs[:k]) for k in range(4))
    tokens = sum(segments)
    slots = torch.repeat_interleave(torch.arange(len(segments)) % adapters, torch.tensor(segments))
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    y = torch.zeros(tokens, offsets[-1], dtype=dtype, device=device)
    results = {}
    for label, ops in (("triton", TritonOps()), ("torch", TorchOps())):
        buf = ops.lora_buffers(adapters, rank, hidden, outs, dtype, device)
        for s in range(adapters):
            for i, n in enumerate(outs):
                ops.lora_write(buf, s, i, torch.randn(rank, hidden, dtype=dtype, device=device) * 0.01,
                               torch.randn(rank, n, dtype=dtype, device=device) * 0.01)
        meta = ops.lora_meta(slots)
        StepUpload(device).send(meta)
        results[label] = timed_us(lambda: ops.lora_apply(x, y, buf, meta), repeats)
        if label == "triton":
            a, b = buf.a, buf.b
    rows = [(s, (slots == s).nonzero().squeeze(1).to(device)) for s in range(adapters)]

    def loop():
        for s, idx in rows:
            xa = x.index_select(0, idx) @ a[s].T
            for i in range(3):
                lo, hi = offsets[i], offsets[i + 1]
                y[idx, lo:hi] += xa[:, i * rank:(i + 1) * rank] @ b[s, :, lo:hi]
    results["per_adapter_loop"] = timed_us(loop, repeats)
    used = min(adapters, len(segments))
    nbytes = (used * (3 * rank * hidden + rank * offsets[-1]) + tokens * (hidden + 2 * offsets[-1])) * dtype.itemsize
    assert lora_triton.BLOCK_R == 16
    return {k: {"us": v, "gb_s": nbytes / v / 1e3} for k, v in results.items()} | {"bytes": nbytes}


def attention_case(rows, context, dtype, device, repeats):
    from quiver.kernels.attention_triton import kv_splits, prefix_paged_attention
    from quiver.kernels.grouping import attention_tiles

    heads, kv_heads, d, bs = 32, 8, 128, 16
    nb = context // bs
    k_cache = torch.randn(kv_heads, rows * nb + 1, bs, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(rows * nb, device=device).view(rows, nb)
    q = torch.randn(rows, 1, heads, d, dtype=dtype, device=device)
    q_start = torch.full((rows,), context - 1, device=device)
    ones, zeros = torch.ones(rows, dtype=torch.long, device=device), torch.zeros(rows, dtype=torch.long, device=device)
    q_offset = torch.arange(rows, device=device)
    tiles = attention_tiles(ones.cpu(), heads // kv_heads).to(device)
    q_flat, splits = q.view(rows, heads, d), kv_splits(tiles.shape[0] * kv_heads, context)  # split-KV as served
    allowed = torch.ones(rows, 1, context, dtype=torch.bool, device=device)
    scale = d ** -0.5
    results = {
        "triton": timed_us(lambda: prefix_paged_attention(q_flat, k_cache, v_cache, tables, q_offset, q_start, ones,
                                                          zeros, zeros, scale, tiles=tiles, splits=splits), repeats),
        "torch_sdpa": timed_us(lambda: torch_ops.paged_attention(q, k_cache, v_cache, tables, allowed, scale), repeats),
    }
    nbytes = 2 * rows * context * kv_heads * d * dtype.itemsize  # K and V read once
    return {k: {"us": v, "gb_s": nbytes / v / 1e3} for k, v in results.items()} | {"bytes": nbytes}


def copy_gb_s(device, repeats: int) -> float:
    """The device's copy bandwidth (bytes read + written per second by a 512 MiB device-to-device copy): the
    ceiling a memory-bound kernel's GB/s is read against."""
    src = torch.empty(2**29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed_us(lambda: dst.copy_(src), repeats) / 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench kernels")
    ap.add_argument("--device", default="cuda", help="a CUDA device: the Triton kernels run only there")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=50)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("quiver bench kernels: needs a CUDA GPU (the Triton kernels run only there)")
    dtype = getattr(torch, args.dtype)
    out = {"machine": machine(), "device": str(device), "dtype": args.dtype, "rank": args.rank,
           "lora": {}, "attention": {}, "copy_gb_s": copy_gb_s(device, 10)}
    print(f"device copy {out['copy_gb_s']:.0f} GB/s")
    with torch.inference_mode():
        for name, (segments, adapters) in LORA_CASES.items():
            out["lora"][name] = r = lora_case(segments, adapters, dtype, device, args.rank, args.repeats)
            print(f"lora  {name:32s} " + "  ".join(f"{k} {v['us']:9.1f} us {v['gb_s']:7.1f} GB/s"
                                                    for k, v in r.items() if k != "bytes"))
        for name, (rows, context) in ATTENTION_CASES.items():
            out["attention"][name] = r = attention_case(rows, context, dtype, device, args.repeats)
            print(f"attn  {name:32s} " + "  ".join(f"{k} {v['us']:9.1f} us {v['gb_s']:7.1f} GB/s"
                                                    for k, v in r.items() if k != "bytes"))
    path = write_json("kernels", out, args.out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
