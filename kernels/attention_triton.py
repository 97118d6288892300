"""Triton paged attention with per-row adapter prefixes (GQA); the maths of
kernels.torch_ops.prefix_paged_attention, over a step's flat tokens.

q [T, H, D] -> out [T, H, D]; caches [KV, num_blocks, bs, D]; block_tables [B, NB]; per row b:
q_offset[b] (flat index of its first query), q_start[b] (its first query's position in the sequence),
q_lens[b], kv_offset[b] (cache index of its own key 0), prefix_len[b]. Query i of row b (token
q_offset[b] + i, head h) attends to the keys j of its block table with j < prefix_len[b] or
kv_offset[b] <= j <= kv_offset[b] + q_start[b] + i, through KV head h // (H / KV):
  out[t, h] = softmax_j(cap(scale * q[t, h] . K[h // g, j])) @ V[h // g]   (float32 accumulation),
cap(s) = softcap * tanh(s / softcap) with a soft-cap (as 2 sigmoid(2x) - 1: Triton 3.6 has no tanh), else s.
With a sliding window W (window > 0) the query at position p = q_start[b] + i keeps the keys less than W
positions back: own key j at position j - kv_offset[b], prefix key j at j - prefix_len[b]
(kernels.torch_meta.attention_mask). Both are compile-time switches (WINDOWED, SOFTCAP): a layer without
them compiles to the plain kernel.

One program per (row tile, KV head, key split). A row tile holds BLOCK_M (query position, head of the
KV group) pairs of one row, so a decode step of a GQA model fills a tile with the group's heads; the
tiles are listed per step (kernels.triton_meta), so decode and prefill rows share one launch and a step
launches programs in proportion to its queries, never rows x its longest chunk, and nothing is padded
or gathered. Keys are walked in BLOCK_N chunks through the block table (each key finds its own cache
block; the block size is a compile-time constant, so that lookup is a shift or a multiply, not a
64-bit division), from the chunk of the first key the tile's first query may see (key 0 without a
window; with one, a long row costs O(W), not O(p)) to the last key its last query may see, with an
online softmax in float32. Each prefill tile walks its row's prefix and earlier chunk again (no sharing
between the tiles of a row). With S > 1 key splits (split-KV, for long keys at small batch) split s walks
the s-th of S equal ranges of those keys and leaves its unnormalised sum, running max and denominator; a
log-sum-exp combine joins them.
bf16 and fp16 q, k, v and p go to the tensor-core dots as they are (float32 accumulation); float32 uses
exact fp32 dots. Triton's CPU interpreter computes bf16 wrongly, so there (and only there) bf16 is
widened first.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quiver.kernels.grouping import ROW_TILE, attention_tiles


# arguments that change from step to step: a specialisation on them (== 1, divisible by 16) would compile
# a new variant on a live request
PER_STEP = ["stride_tb", "pairs"]


@triton.jit(do_not_specialize=PER_STEP)
def _prefix_paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, tiles_ptr, tables_ptr, q_off_ptr,
                            q_start_ptr, q_lens_ptr, kv_off_ptr, prefix_ptr, scale, window, softcap, GROUP, D,
                            stride_qt, stride_qh, stride_kh, stride_kb, stride_ks, stride_tb, stride_ot, stride_oh,
                            pairs, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr):
    """part [S, T, H, D] and ml [2, S, T, H] float32 (pairs = T * H) take split-KV's partial results;
    window and softcap are read only when WINDOWED, SOFTCAP."""
    tile, kvh, split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    splits = tl.num_programs(2)
    b = tl.load(tiles_ptr + 2 * tile)
    pid_m = tl.load(tiles_ptr + 2 * tile + 1)
    # int32 positions and key indices: the key loop's arithmetic stays 32-bit
    q_off = tl.load(q_off_ptr + b).to(tl.int32)
    q_start = tl.load(q_start_ptr + b).to(tl.int32)
    q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    kv_off = tl.load(kv_off_ptr + b).to(tl.int32)
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rm // GROUP  # query position within the row
    head = kvh * GROUP + rm % GROUP
    m_valid = qi < q_len
    tok = (q_off + qi).to(tl.int64)  # flat token of each query
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + rd[None, :],
                mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_tok = q_start + tl.minimum(qi, q_len - 1)  # position of each query in its sequence
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    n_end = kv_off + q_start + last_q + 1  # no query of this tile sees a key past this
    n_start = 0
    if WINDOWED:  # the first key the tile's first query sees: a prefix key while that query is < W - 1
        oldest = q_start + (pid_m * BLOCK_M) // GROUP - window + 1  # position; the prefix's are negative
        n_start = tl.where(oldest < 0, tl.maximum(prefix + oldest, 0), kv_off + oldest) // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(n_end - n_start, splits), BLOCK_N) * BLOCK_N  # this split's keys: lo .. lo + chunk - 1
    lo = n_start + split * chunk
    hi = tl.minimum(lo + chunk, n_end)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        key_ok = (rn < prefix) | ((rn >= kv_off) & (rn < n_end))
        blk = tl.load(table + rn // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_base = kvh * stride_kh + blk * stride_kb + (rn % BLOCK_SIZE) * stride_ks
        kt = tl.load(k_ptr + kv_base[None, :] + rd[:, None], mask=d_mask[:, None] & key_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale  # [M, N], float32
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(s * (2.0 / softcap)) - 1.0)
        allowed = key_ok[None, :] & ((rn[None, :] < prefix) | (rn[None, :] - kv_off <= q_tok[:, None]))
        if WINDOWED:
            pos = tl.where(rn >= kv_off, rn - kv_off, rn - prefix)  # each key's position
            allowed = allowed & (q_tok[:, None] - pos[None, :] < window)
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
    io_mask = m_valid[:, None] & d_mask[None, :]
    if splits == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        pair = split * pairs + tok * (GROUP * tl.num_programs(1)) + head  # [S, T, H] index
        tl.store(part_ptr + pair[:, None] * D + rd[None, :], acc, mask=io_mask)
        tl.store(ml_ptr + pair, m_i, mask=m_valid)
        tl.store(ml_ptr + splits * pairs + pair, l_i, mask=m_valid)


BLOCK_M = ROW_TILE
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# programs one launch should fill (an H100's SM count); split-KV splits a row's keys only while the
# launch has fewer, and gives each split at least KEYS_PER_SPLIT keys
NOMINAL_SMS, KEYS_PER_SPLIT, MAX_SPLITS = 132, 256, 16


# (largest head size, 2-byte dtype) -> BLOCK_N, num_warps: the widest key tile with no register spill
# on sm_80 or sm_90 (ptxas -v, Triton 3.9); the q, K and V pointer tiles are what fill the registers
CONFIGS = {(64, True): (64, 4), (64, False): (32, 8), (128, True): (64, 8), (128, False): (32, 8),
           (256, True): (32, 8), (256, False): (16, 8)}


def config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile and launch sizes by head size and dtype: a table, not @triton.autotune, which benchmarks at
    first use (on a live request) and cannot run in the interpreter."""
    half = dtype.itemsize == 2
    top = next((top for top in (64, 128) if head_dim <= top), 256)
    block_n, warps = CONFIGS[top, half]
    return dict(BLOCK_N=block_n, num_warps=warps, num_stages=2)


def kv_splits(programs: int, max_keys: int) -> int:
    """Key splits per row for a launch of `programs` (tile, KV head) programs whose longest row sees
    max_keys keys: enough to fill NOMINAL_SMS, never under KEYS_PER_SPLIT keys each, at most MAX_SPLITS."""
    return max(1, min(-(-NOMINAL_SMS // programs), max_keys // KEYS_PER_SPLIT, MAX_SPLITS))


def _check(q, k_cache, v_cache, block_tables, rows: tuple, tiles) -> None:
    """The layout the kernel assumes (it indexes raw pointers): fail loudly instead of reading wrong memory.
    rows: the [B] int64 q_offset, q_start, q_lens, kv_offset, prefix_len."""
    h, d = q.shape[1:]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == d and h % k_cache.shape[0] == 0, k_cache.shape
    assert q.stride(2) == k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride(), "contiguous head dims"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.device == k_cache.device
    assert block_tables.stride(1) == 1, "a contiguous block table row"
    for x in (block_tables, *rows):
        assert x.device == q.device and x.dtype == torch.int64 and x.shape[0] == block_tables.shape[0], x
    assert tiles.dtype == torch.int32 and tiles.device == q.device and tiles.shape[1] == 2, tiles


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_offset, q_start, q_lens, kv_offset, prefix_len,
                           scale, tiles: torch.Tensor | None = None, splits: int = 1, window: int | None = None,
                           softcap: float | None = None):
    """q [T, H, D] -> [T, H, D] (the module docstring). tiles: the step's [n, 2] int32 (row, block) list
    (kernels.grouping.attention_tiles), made here (a device-to-host read of q_lens) when not given.
    splits: key splits per row (kv_splits chooses them for a step). window (>= 1), softcap: as
    kernels.torch_ops.prefix_paged_attention takes them, None for none."""
    t, h, d = q.shape
    kv, _, bs, _ = k_cache.shape
    group = h // kv
    if tiles is None:
        tiles = attention_tiles(q_lens.cpu(), group).to(q.device)
    _check(q, k_cache, v_cache, block_tables, (q_offset, q_start, q_lens, kv_offset, prefix_len), tiles)
    out = torch.empty_like(q)  # every real query is written
    part = ml = torch.empty(0, dtype=torch.float32, device=q.device)
    if splits > 1:
        part = torch.empty(splits, t, h, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(2, splits, t, h, dtype=torch.float32, device=q.device)
    _prefix_paged_attention[(tiles.shape[0], kv, splits)](
        q, k_cache, v_cache, out, part, ml, tiles, block_tables, q_offset, q_start, q_lens, kv_offset, prefix_len,
        scale, window or 0, softcap or 1.0, group, d, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), t * h,
        BLOCK_SIZE=bs, BLOCK_M=BLOCK_M, BLOCK_D=max(16, triton.next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else None, UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        WINDOWED=window is not None, SOFTCAP=softcap is not None, **config(d, q.dtype))
    if splits > 1:
        out.copy_(combine_splits(part, ml[0], ml[1]))
    return out


def combine_splits(part: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """part [S, T, H, D] (each split's unnormalised sum of p V), m, l [S, T, H] (its running max and
    sum of p) -> [T, H, D]: sum_s e^(m_s - M) part_s / sum_s e^(m_s - M) l_s with M = max_s m_s (every
    query sees its own key, so M is finite; a split that saw no key has m = -inf and weighs 0)."""
    w = torch.exp(m - m.amax(0))
    return (part * w[..., None]).sum(0) / (l * w).sum(0)[..., None]
