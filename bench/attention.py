"""Attention for mixed prefill + decode steps (CPU by default, or --device cuda[:N]), three ways side by
side in one run (SmolLM2's shapes by default: 9 query heads, 3 KV heads, head size 64):

  planned  what the engine runs: rows packed into groups whose padding stays bounded (long chunks split
           into query tiles: kernels.torch_meta.plan_attention), one fused SDPA with a mask per group;
  padded   the layout before it: decode rows in one group and prefill rows in another, each padded to
           its longest chunk x its longest context, keys gathered block by block, an additive mask;
  sdpa     torch.nn.functional.scaled_dot_product_attention once per row, over that row's own keys.

Each scenario reports milliseconds per layer (median of --repeats; what is built once per step is
left out) and the largest mask (planned) or score tensor (padded, sdpa: its mask) one call builds, in
MiB at the element size of --dtype. All three are checked against each other before timing (tolerance
1e-4 in float32, 3e-3 in float16, 2e-2 in bfloat16).

    quiver bench attention [--repeats 20] [--threads N] [--heads 9] [--kv-heads 3] [--head-dim 64]
                           [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]

--dtype auto is bfloat16 on a GPU and on a CPU with AVX512-BF16 or AMX, float32 on other CPUs (there is no
checkpoint to take it from).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from quiver.bench.common import add_device_args, add_out_arg, dtype_name, machine, synchronize, write_json
from quiver.kernels.torch_meta import attention_mask, plan_attention
from quiver.kernels.torch_ops import paged_attention
from quiver.server.engine.device import make_current, resolve_device

BLOCK = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # atol = rtol of the cross-check
# scenario -> rows as (queries this step, tokens already cached)
SCENARIOS = {
    "decode 32, contexts 100-600": [(1, 100 + 16 * i) for i in range(32)],
    "decode 32, one at 4000": [(1, 50)] * 31 + [(1, 4000)],
    "31 decode + prefill 512": [(1, 100 + 16 * i) for i in range(31)] + [(512, 0)],
    "31 decode + chunk 2048 at 4096": [(1, 100 + 16 * i) for i in range(31)] + [(2048, 4096)],
    "63 prompts of 2 + chunk 2048": [(2, 0)] * 63 + [(2048, 0)],
}


def attention_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bfloat16 on a GPU and where the CPU has bfloat16 matmuls, else float32."""
    if name == "auto":
        from quiver.server.engine.device import cpu_bf16_flag
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16_flag() else torch.float32
    return getattr(torch, name)


def make_step(rows, heads, kv_heads, d, g, device="cpu", dtype=torch.float32):
    """A KV cache holding every row's keys, the step's queries, and each row's block table: drawn on the
    CPU from the generator g (the same numbers on every device), then moved to device in dtype."""
    blocks = [-(-(cached + q) // BLOCK) for q, cached in rows]
    total = sum(blocks)
    k_cache = torch.randn(kv_heads, total + 1, BLOCK, d, generator=g)
    v_cache = torch.randn(kv_heads, total + 1, BLOCK, d, generator=g)
    k_cache[:, total] = 0
    v_cache[:, total] = 0
    tables, first = [], 0
    for n in blocks:
        tables.append(list(range(first, first + n)))
        first += n
    q = torch.randn(sum(q for q, _ in rows), heads, d, generator=g)
    return q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), tables


def planned(q, k_cache, v_cache, rows, tables, scale):
    """The engine's masked layout: the step's plan and masks (once per step), then per layer one fused
    paged_attention per group, on q's device. Returns (run, largest mask in elements)."""
    heads, dev = q.shape[1], q.device
    starts, lens = [c for _, c in rows], [n for n, _ in rows]
    offsets = torch.cumsum(torch.tensor([0] + lens[:-1], device=dev), 0)
    pad = k_cache.shape[1] - 1  # the always-zero block
    width = max(map(len, tables))
    table_t = torch.tensor([t + [pad] * (width - len(t)) for t in tables], device=dev)
    groups, biggest = [], 0
    for items in plan_attention(starts, lens, [0] * len(rows)):
        r, f, n = (torch.tensor(col, device=dev) for col in zip(*items))
        start = torch.tensor(starts, device=dev)[r] + f
        max_q = int(n.max())
        nb = -(-int((start + n).max()) // BLOCK)
        zeros = torch.zeros_like(r)
        steps = torch.arange(max_q, device=dev)
        index = (offsets[r] + f)[:, None] + torch.minimum(steps[None, :], n[:, None] - 1)
        valid = steps[None, :] < n[:, None]
        groups.append((index, valid, table_t[r, :nb], attention_mask(start, n, zeros, zeros, max_q, nb * BLOCK)))
        biggest = max(biggest, len(items) * max_q * nb * BLOCK)

    def run():
        out = torch.empty_like(q)
        for index, valid, table, allowed in groups:
            b, max_q = index.shape
            o = paged_attention(q[index.reshape(-1)].view(b, max_q, heads, -1), k_cache, v_cache, table, allowed, scale)
            out[index[valid]] = o[valid]
        return out
    return run, biggest


def padded(q, k_cache, v_cache, rows, tables, scale):
    """The layout before the planner: decode rows and prefill rows, each group padded to its longest
    chunk and context, keys gathered block by block, an additive mask built once per step (all on q's
    device, in q's dtype)."""
    heads, d, dev = q.shape[1], q.shape[2], q.device
    kv = k_cache.shape[0]
    g = heads // kv
    first = [0]
    for n, _ in rows:
        first.append(first[-1] + n)
    groups, biggest = [], 0
    for members in ([i for i, (n, _) in enumerate(rows) if n == 1], [i for i, (n, _) in enumerate(rows) if n > 1]):
        if not members:
            continue
        b, max_q = len(members), max(rows[i][0] for i in members)
        nb = max(-(-(rows[i][1] + rows[i][0]) // BLOCK) for i in members)
        length = nb * BLOCK
        biggest = max(biggest, b * max_q * heads * length)
        if b * max_q * heads * length * q.element_size() > 2 * 2**30:
            return None, biggest  # over 2 GiB of scores: not run
        table = torch.tensor([tables[i][:nb] + [0] * (nb - len(tables[i][:nb])) for i in members], device=dev)
        cached = torch.tensor([rows[i][1] for i in members], device=dev)
        n_q = torch.tensor([rows[i][0] for i in members], device=dev)
        last = cached[:, None] + torch.minimum(torch.arange(max_q, device=dev)[None, :], n_q[:, None] - 1)
        bias = torch.zeros(b, max_q, length, dtype=q.dtype, device=dev).masked_fill_(
            torch.arange(length, device=dev)[None, None, :] > last[:, :, None], float("-inf"))
        index = torch.tensor([first[i] + min(t, rows[i][0] - 1) for i in members for t in range(max_q)], device=dev)
        groups.append((members, b, max_q, length, table.reshape(-1), bias, index))

    def run():
        out = torch.empty_like(q)
        for members, b, max_q, length, flat, bias, index in groups:
            keys = k_cache.index_select(1, flat).view(kv, b, length, d)
            values = v_cache.index_select(1, flat).view(kv, b, length, d)
            qh = q[index].view(b, max_q, kv, g, d).permute(2, 0, 1, 3, 4).reshape(kv, b, max_q * g, d)
            scores = torch.matmul(qh, keys.transpose(-1, -2)).view(kv, b, max_q, g, length).mul_(scale)
            probs = torch.softmax(scores.add_(bias[None, :, :, None, :]), dim=-1).view(kv, b, max_q * g, length)
            o = torch.matmul(probs, values).view(kv, b, max_q, g, d).permute(1, 2, 0, 3, 4).reshape(b, max_q, heads, d)
            for j, i in enumerate(members):
                out[first[i]:first[i] + rows[i][0]] = o[j, :rows[i][0]]
        return out
    return run, biggest


def sdpa(q, k_cache, v_cache, rows, tables, scale):
    """SDPA once per row over its own keys (prefill rows with a bottom-right causal mask), on q's device."""
    heads, dev = q.shape[1], q.device
    kv, _, _, d = k_cache.shape
    prepared, biggest, first = [], 0, 0
    for (n, cached), table in zip(rows, tables):
        keys_n = cached + n
        mask = (None if n == 1 else
                torch.arange(keys_n, device=dev)[None, :] <= cached + torch.arange(n, device=dev)[:, None])
        prepared.append((first, n, keys_n, torch.tensor(table, device=dev), mask))
        biggest = max(biggest, n * heads * keys_n)
        first += n

    def run():
        out = torch.empty_like(q)
        for first, n, keys_n, idx, mask in prepared:
            k = k_cache.index_select(1, idx).reshape(kv, -1, d)[:, :keys_n]
            v = v_cache.index_select(1, idx).reshape(kv, -1, d)[:, :keys_n]
            o = F.scaled_dot_product_attention(q[first:first + n].transpose(0, 1)[None], k[None], v[None],
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out[first:first + n] = o[0].transpose(0, 1)
        return out
    return run, biggest


def timed(fn, repeats, device="cpu"):
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench attention")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # checked; cuda -> cuda:0
    make_current(device)
    dtype = attention_dtype(args.dtype, device)
    tol = TOLERANCE[dtype]
    scale = args.head_dim ** -0.5
    results = []
    with torch.inference_mode():
        for name in args.scenarios:
            rows = SCENARIOS[name]
            q, kc, vc, tables = make_step(rows, args.heads, args.kv_heads, args.head_dim,
                                          torch.Generator().manual_seed(0), device, dtype)
            row = {"scenario": name, "rows": len(rows), "tokens": q.shape[0]}
            want = sdpa(q, kc, vc, rows, tables, scale)[0]()
            for label, method in (("planned", planned), ("padded", padded), ("sdpa", sdpa)):
                run, biggest = method(q, kc, vc, rows, tables, scale)
                row[f"{label}_scores_mib"] = biggest * q.element_size() / 2**20
                if run is None:
                    row[f"{label}_ms"] = None
                    continue
                torch.testing.assert_close(run(), want, atol=tol, rtol=tol)
                row[f"{label}_ms"] = timed(run, args.repeats, device)
            results.append(row)
            fmt = lambda v: "n/a" if v is None else f"{v:8.2f}"  # noqa: E731
            print(f"{name:34s} planned {fmt(row['planned_ms'])} ms ({row['planned_scores_mib']:7.1f} MiB)  "
                  f"padded {fmt(row['padded_ms'])} ms ({row['padded_scores_mib']:9.1f} MiB)  "
                  f"sdpa per row {fmt(row['sdpa_ms'])} ms")
    out = {"machine": machine(), "device": args.device, "dtype": dtype_name(dtype), "heads": args.heads,
           "kv_heads": args.kv_heads, "head_dim": args.head_dim,
           "block_size": BLOCK, "per": "one layer's attention", "results": results}
    path = write_json("attention", out, args.out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
