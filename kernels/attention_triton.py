"""Triton paged attention with per-row adapter prefixes (GQA); the maths of
kernels.torch_ops.prefix_paged_attention.

One program per (row tile, KV head). A row tile holds BLOCK_M (query position, head of the KV
group) pairs of one row, so a decode step of a GQA model fills a tile with the group's heads; the
tiles are listed per step (kernels.grouping.attention_tiles), so a step launches programs in proportion
to its queries, not rows x its longest chunk. Keys are walked in BLOCK_N chunks through the block
table (each key finds its own cache block, so BLOCK_N does not depend on the cache block size), up to
the last key the tile's last query may see, with an online softmax in float32. bf16 and fp16 q, k, v
and p go to the tensor-core dots as they are (float32 accumulation); float32 uses exact fp32 dots.
Triton's CPU interpreter computes bf16 wrongly, so there (and only there) bf16 is widened first.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quiver.kernels.grouping import ROW_TILE, attention_tiles


@triton.jit
def _prefix_paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, tiles_ptr, tables_ptr, q_start_ptr, q_lens_ptr, kv_off_ptr,
                            prefix_ptr, scale, GROUP, BLOCK_SIZE, D,
                            stride_qb, stride_qq, stride_qh, stride_kh, stride_kb, stride_ks,
                            stride_tb, stride_ob, stride_oq, stride_oh,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    tile, kvh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b = tl.load(tiles_ptr + 2 * tile).to(tl.int64)
    pid_m = tl.load(tiles_ptr + 2 * tile + 1).to(tl.int64)
    q_start = tl.load(q_start_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    kv_off = tl.load(kv_off_ptr + b)
    prefix = tl.load(prefix_ptr + b)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rm // GROUP  # query position within the row
    head = kvh * GROUP + rm % GROUP
    m_valid = qi < q_len
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    q = tl.load(q_ptr + b * stride_qb + qi[:, None] * stride_qq + head[:, None] * stride_qh + rd[None, :],
                mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_tok = q_start + tl.minimum(qi, q_len - 1)  # token index of each query
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    n_end = kv_off + q_start + last_q + 1  # no query of this tile sees a key past this
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        key_ok = (rn < prefix) | ((rn >= kv_off) & (rn < n_end))
        blk = tl.load(tables_ptr + b * stride_tb + rn // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_base = kvh * stride_kh + blk * stride_kb + (rn % BLOCK_SIZE) * stride_ks
        kt = tl.load(k_ptr + kv_base[None, :] + rd[:, None], mask=d_mask[:, None] & key_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale  # [M, N], float32
        allowed = key_ok[None, :] & ((rn[None, :] < prefix) | (rn[None, :] - kv_off <= q_tok[:, None]))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + kv_base[:, None] + rd[None, :], mask=key_ok[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + qi[:, None] * stride_oq + head[:, None] * stride_oh + rd[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


BLOCK_M, BLOCK_N = ROW_TILE, 32
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len, scale,
                           tiles: torch.Tensor | None = None):
    """tiles: the step's [n, 2] int32 (row, block) list (kernels.grouping.attention_tiles); made here
    (a device-to-host read of q_lens) when not given."""
    b, nq, h, d = q.shape
    kv, _, bs, _ = k_cache.shape
    # the layout the kernel assumes (it indexes raw pointers)
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == d and h % kv == 0, (q.shape, k_cache.shape)
    assert q.stride(3) == k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride(), "contiguous head dims"
    assert block_tables.shape[0] == b and block_tables.stride(1) == 1, block_tables.shape
    assert all(t.shape == (b,) for t in (q_start, q_lens, kv_offset, prefix_len)), "one entry per row"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.device == k_cache.device == block_tables.device
    group = h // kv
    if tiles is None:
        tiles = attention_tiles(q_lens.cpu(), group).to(q.device)
    assert tiles.dtype == torch.int32 and tiles.device == q.device
    out = torch.empty_like(q)  # every real query is written; padding rows are never read
    grid = (tiles.shape[0], kv)
    _prefix_paged_attention[grid](
        q, k_cache, v_cache, out, tiles, block_tables, q_start, q_lens, kv_offset, prefix_len, scale, group, bs, d,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else None, UPCAST=INTERPRETED and q.dtype == torch.bfloat16)
    return out
