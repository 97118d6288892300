"""Triton paged attention with per-row adapter prefixes (GQA); same maths as
kernels.torch_ops.prefix_paged_attention.

One program per (row, KV head, block of query rows). The query rows of a program are
(query position, head of the KV group) pairs, so a decode step of a GQA model fills a tile
with the group's heads. Keys are walked in BLOCK_N chunks through the block table (each key
finds its own cache block, so BLOCK_N does not depend on the cache block size), with an
online softmax in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefix_paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, q_start_ptr, q_lens_ptr, kv_off_ptr,
                            prefix_ptr, scale, GROUP, BLOCK_SIZE, D,
                            stride_qb, stride_qq, stride_qh, stride_kh, stride_kb, stride_ks,
                            stride_tb, stride_ob, stride_oq, stride_oh,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
    b, kvh, pid_m = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
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
                mask=m_valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q_tok = q_start + tl.minimum(qi, q_len - 1)  # token index of each query
    n_end = kv_off + q_start + q_len  # keys beyond this are never visible
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        key_ok = (rn < prefix) | ((rn >= kv_off) & (rn < n_end))
        blk = tl.load(tables_ptr + b * stride_tb + rn // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_base = kvh * stride_kh + blk * stride_kb + (rn % BLOCK_SIZE) * stride_ks
        kt = tl.load(k_ptr + kv_base[None, :] + rd[:, None], mask=d_mask[:, None] & key_ok[None, :],
                     other=0.0).to(tl.float32)  # [D, N]
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        allowed = key_ok[None, :] & ((rn[None, :] < prefix) | (rn[None, :] - kv_off <= q_tok[:, None]))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + kv_base[:, None] + rd[None, :], mask=key_ok[:, None] & d_mask[None, :],
                     other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + qi[:, None] * stride_oq + head[:, None] * stride_oh + rd[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


BLOCK_M, BLOCK_N = 16, 32


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len, scale):
    b, nq, h, d = q.shape
    kv, _, bs, _ = k_cache.shape
    # the layout the kernel assumes (it indexes raw pointers)
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == d and h % kv == 0, (q.shape, k_cache.shape)
    assert q.stride(3) == k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride(), "contiguous head dims"
    assert block_tables.shape[0] == b and block_tables.stride(1) == 1, block_tables.shape
    assert all(t.shape == (b,) for t in (q_start, q_lens, kv_offset, prefix_len)), "one entry per row"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.device == k_cache.device == block_tables.device
    group = h // kv
    out = torch.zeros_like(q)
    grid = (b, kv, triton.cdiv(nq * group, BLOCK_M))
    _prefix_paged_attention[grid](
        q, k_cache, v_cache, out, block_tables, q_start, q_lens, kv_offset, prefix_len, scale, group, bs, d,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else None)
    return out
