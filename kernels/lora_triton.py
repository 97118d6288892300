"""Triton batched-LoRA kernels (the CUDA path); the maths of kernels.torch_ops.lora_shrink_ref / lora_expand_ref.

Segmented form (SGMV, for prefill): tokens grouped by adapter; one program per (row tile of a
segment, column block), the row tiles listed per step (TritonLoraMeta.m_tiles: only tiles that hold
tokens are launched), tensor-core dots with float32 accumulation. Gathered form (BGMV, for decode):
one program per (adapter token, column block), each token reading its own adapter's weights.
xa, the shrink's output, holds only the adapter tokens, in seg_index order (row i: token seg_index[i]).
Both expand kernels cover every slice of a fused projection (q/k/v, gate/up) in one launch: each
column tile belongs to exactly one slice and reads that slice's rank columns of xa. The rank is
walked in BLOCK_R steps, so shared memory does not grow with --max-lora-rank.

Split-K shrink: a launch with fewer programs than the GPU has SMs (decode: a few tokens, one column
block at rank 16) also splits the input dimension K into chunks, a third grid axis; each program writes
its chunk's partial dot to fp32 partials [chunks, n, N], summed in torch in a fixed order (deterministic,
no atomics). Arguments that change from step to step (the chunk length, the partials' stride) are not
specialized on, so a live server compiles each kernel once per dtype and output type.

Precision: float32 inputs use exact fp32 dots (no TF32: fp32 serving matches PEFT to 1e-4); bf16 and
fp16 inputs use their tensor-core dots. Triton's CPU interpreter computes bf16 wrongly, so there
(and only there) bf16 operands are widened to fp32 first (UPCAST).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from quiver.kernels.grouping import ROW_TILE
from quiver.kernels.triton_meta import TritonLoraMeta

PER_STEP = ["K_CHUNK", "stride_os"]  # int arguments that change with the step's tokens: never specialized on


@triton.jit
def _tile_rows(m_tiles_ptr, seg_index_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, BLOCK_M: tl.constexpr):
    """This program's adapter slot, and the rows of its row tile: tokens, their rows of xa, their mask."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(m_tiles_ptr + 2 * pid).to(tl.int64)
    m0 = tl.load(m_tiles_ptr + 2 * pid + 1).to(tl.int64) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    m_mask = rm < tl.load(seg_lens_ptr + seg)
    row = tl.load(seg_starts_ptr + seg).to(tl.int64) + rm
    tok = tl.load(seg_index_ptr + row, mask=m_mask, other=0).to(tl.int64)
    return tl.load(seg_slots_ptr + seg).to(tl.int64), tok, row, m_mask


@triton.jit(do_not_specialize=PER_STEP)
def _shrink_sgmv(x_ptr, a_ptr, out_ptr, m_tiles_ptr, seg_index_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
                 K, N, K_CHUNK, stride_xt, stride_al, stride_an, stride_os, stride_ot,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    slot, tok, row, m_mask = _tile_rows(m_tiles_ptr, seg_index_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_lo = tl.program_id(2) * K_CHUNK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + K_CHUNK, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + slot * stride_al + rn[None, :] * stride_an + rk[:, None],
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            xt, at = xt.to(tl.float32), at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)
    out_ptr += tl.program_id(2).to(tl.int64) * stride_os
    tl.store(out_ptr + row[:, None] * stride_ot + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _expand_sgmv(xa_ptr, b_ptr, y_ptr, m_tiles_ptr, seg_index_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
                 tile_slice_ptr, tile_n0_ptr, slice_end_ptr, R, stride_xat, stride_bl, stride_br, stride_yt,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    slot, tok, row, m_mask = _tile_rows(m_tiles_ptr, seg_index_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, BLOCK_M)
    pid_n = tl.program_id(1)
    s = tl.load(tile_slice_ptr + pid_n)
    rn = tl.load(tile_n0_ptr + pid_n) + tl.arange(0, BLOCK_N)
    n_mask = rn < tl.load(slice_end_ptr + s)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < R
        xat = tl.load(xa_ptr + row[:, None] * stride_xat + s * R + rr[None, :],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + slot * stride_bl + rr[:, None] * stride_br + rn[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            xat, bt = xat.to(tl.float32), bt.to(tl.float32)
        acc += tl.dot(xat, bt, input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + tok[:, None] * stride_yt + rn[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=PER_STEP)
def _shrink_bgmv(x_ptr, a_ptr, out_ptr, tokens_ptr, slots_ptr, K, N, K_CHUNK, stride_xt, stride_al, stride_an,
                 stride_os, stride_ot, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(tokens_ptr + row).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_lo = tl.program_id(2) * K_CHUNK
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + K_CHUNK, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xv = tl.load(x_ptr + t * stride_xt + rk, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(a_ptr + slot * stride_al + rn[:, None] * stride_an + rk[None, :],
                     mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(at * xv[None, :], axis=1)
    out_ptr += tl.program_id(2).to(tl.int64) * stride_os
    tl.store(out_ptr + row * stride_ot + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _expand_bgmv(xa_ptr, b_ptr, y_ptr, tokens_ptr, slots_ptr, tile_slice_ptr, tile_n0_ptr, slice_end_ptr, R,
                 stride_xat, stride_bl, stride_br, stride_yt, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(tokens_ptr + row).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    pid_n = tl.program_id(1)
    s = tl.load(tile_slice_ptr + pid_n)
    rn = tl.load(tile_n0_ptr + pid_n) + tl.arange(0, BLOCK_N)
    n_mask = rn < tl.load(slice_end_ptr + s)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < R
        xv = tl.load(xa_ptr + row * stride_xat + s * R + rr, mask=r_mask, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + slot * stride_bl + rr[None, :] * stride_br + rn[:, None],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bt * xv[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_yt + rn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=n_mask)


# ---- host side ---------------------------------------------------------------------------------

BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R = ROW_TILE, 64, 32, 16
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMS = 132  # a nominal GPU's SMs (H100): a shrink launch with fewer programs than this splits K
PROGRAMS_PER_SM = 4  # what a split aims for: a few programs per SM to hide memory latency
MIN_TRIPS = 8  # BLOCK_K steps each K chunk walks at least


def _precision(t: torch.Tensor) -> str | None:
    # exact fp32 (no TF32) so that fp32 serving matches PEFT to 1e-4; half types use their tensor-core dots
    return "ieee" if t.dtype == torch.float32 else None


def _upcast(t: torch.Tensor) -> bool:
    return INTERPRETED and t.dtype == torch.bfloat16


@functools.lru_cache(maxsize=64)
def _tiles(offsets: tuple[int, ...], block_n: int, device: str):
    """Column tiles of a fused projection, none crossing a slice boundary."""
    slice_of, start = [], []
    for s in range(len(offsets) - 1):
        for n0 in range(offsets[s], offsets[s + 1], block_n):
            slice_of.append(s)
            start.append(n0)
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(slice_of), as_t(start), as_t(list(offsets[1:]))


def split_k(programs: int, k: int, split: int | None = None) -> tuple[int, int]:
    """(chunks, chunk length) of K for a shrink launch of `programs` (rows x column blocks): 1 chunk when
    the launch fills every SM already, else enough for PROGRAMS_PER_SM per SM, each chunk at least
    MIN_TRIPS BLOCK_K steps; `split` asks for that many chunks instead. Chunks are whole BLOCK_K steps."""
    trips = triton.cdiv(k, BLOCK_K)
    if split is None:
        split = 1 if programs >= SMS else min(triton.cdiv(PROGRAMS_PER_SM * SMS, programs), trips // MIN_TRIPS)
    per_chunk = triton.cdiv(trips, max(1, min(split, trips)))
    return triton.cdiv(trips, per_chunk), per_chunk * BLOCK_K


def _shrink(kernel, grid_mn: tuple[int, int], x, a, meta: TritonLoraMeta, meta_args, split: int | None,
            **consts) -> torch.Tensor:
    """xa [n, N]: row i = x[seg_index[i]] @ a[its slot]^T. With K split, each chunk's fp32 partials are
    summed here, in chunk order."""
    k, n = x.shape[1], a.shape[1]
    rows = meta.seg_index.shape[0]
    chunks, chunk = split_k(grid_mn[0] * grid_mn[1], k, split)
    out = (torch.empty(rows, n, dtype=x.dtype, device=x.device) if chunks == 1
           else torch.empty(chunks, rows, n, dtype=torch.float32, device=x.device))
    kernel[(*grid_mn, chunks)](x, a, out, *meta_args, k, n, chunk, x.stride(0), a.stride(0), a.stride(1),
                               out.stride(0) if chunks > 1 else 0, out.stride(-2), BLOCK_K=BLOCK_K, **consts)
    return out if chunks == 1 else out.sum(0).to(x.dtype)


def lora_shrink_sgmv(x, a, meta: TritonLoraMeta, split: int | None = None) -> torch.Tensor:
    grid = (meta.m_tiles.shape[0], triton.cdiv(a.shape[1], BLOCK_N))
    return _shrink(_shrink_sgmv, grid, x, a, meta, (meta.m_tiles, meta.seg_index, meta.seg_starts, meta.seg_lens,
                                                    meta.seg_slots), split,
                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=_precision(x), UPCAST=_upcast(x))


def lora_expand_sgmv(xa, b, offsets, meta: TritonLoraMeta, y) -> torch.Tensor:
    tile_slice, tile_n0, slice_end = _tiles(tuple(offsets), BLOCK_N, str(y.device))
    grid = (meta.m_tiles.shape[0], tile_slice.numel())
    _expand_sgmv[grid](xa, b, y, meta.m_tiles, meta.seg_index, meta.seg_starts, meta.seg_lens, meta.seg_slots,
                       tile_slice, tile_n0, slice_end, b.shape[1], xa.stride(0), b.stride(0), b.stride(1), y.stride(0),
                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, PRECISION=_precision(xa),
                       UPCAST=_upcast(xa))
    return y


def lora_shrink_bgmv(x, a, meta: TritonLoraMeta, split: int | None = None) -> torch.Tensor:
    grid = (meta.seg_index.numel(), triton.cdiv(a.shape[1], BLOCK_N))
    return _shrink(_shrink_bgmv, grid, x, a, meta, (meta.seg_index, meta.token_slots), split, BLOCK_N=BLOCK_N)


def lora_expand_bgmv(xa, b, offsets, meta: TritonLoraMeta, y) -> torch.Tensor:
    tile_slice, tile_n0, slice_end = _tiles(tuple(offsets), BLOCK_N, str(y.device))
    _expand_bgmv[(meta.seg_index.numel(), tile_slice.numel())](
        xa, b, y, meta.seg_index, meta.token_slots, tile_slice, tile_n0, slice_end, b.shape[1], xa.stride(0),
        b.stride(0), b.stride(1), y.stride(0), BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    return y


def _check(x, y, a, b, offsets, meta: TritonLoraMeta) -> None:
    """The layout the kernels assume (they index raw pointers): fail loudly instead of reading wrong memory."""
    t, k = x.shape
    assert y.shape == (t, offsets[-1]) and a.dim() == 3 and b.dim() == 3, (x.shape, y.shape, a.shape, b.shape)
    assert a.shape[2] == k and b.shape[0] == a.shape[0] and b.shape[2] == offsets[-1], (a.shape, b.shape, offsets)
    assert a.shape[1] == (len(offsets) - 1) * b.shape[1], "a holds S*R rows for S slices of rank R"
    assert x.stride(1) == y.stride(1) == a.stride(2) == b.stride(2) == 1, "the last dimension must be contiguous"
    assert x.dtype == y.dtype == a.dtype == b.dtype and x.device == y.device == a.device == b.device
    assert meta.token_slots.dtype == meta.seg_index.dtype == torch.int64 and meta.token_slots.shape == (t,)
    assert meta.m_tiles.dtype == torch.int32 and meta.m_tiles.device == x.device


def lora_apply(x, y, a, b, offsets, meta: TritonLoraMeta) -> None:
    """Segmented kernels when adapters own long runs of tokens (prefill), gathered ones otherwise."""
    _check(x, y, a, b, offsets, meta)
    if meta.max_len >= BLOCK_M:
        lora_expand_sgmv(lora_shrink_sgmv(x, a, meta), b, offsets, meta, y)
    else:
        lora_expand_bgmv(lora_shrink_bgmv(x, a, meta), b, offsets, meta, y)
