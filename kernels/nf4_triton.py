"""Triton dequantization of a bitsandbytes 4-bit weight (NF4 or FP4; the CUDA path of
server.model.fourbit): one launch turns a whole projection into the compute dtype, which cuBLAS then
multiplies, where the torch path would take thousands of small launches per layer.

Maths, for W [out, in] flattened row-major to n = out·in elements:

    W.flat[i] = code[q[i]] * absmax[i // blocksize]      (in fp32, then cast once to out's dtype)

q[i] is the 4-bit index of element i: the high nibble of data[i // 2] for even i, the low nibble for odd
i. With double quantization absmax is the fp32 expansion done at load (fourbit.expand_absmax), so the
kernel never sees the 8-bit absmax codes.

Shapes: data uint8 [⌈n/2⌉], absmax fp32 [⌈n/blocksize⌉], code fp32 [16] (the NF4 or FP4 table),
out [n] fp32, bf16 or fp16. blocksize is even (bitsandbytes uses powers of two, 32..4096), so both
elements of a byte share one scale. One program per BYTES bytes (2·BYTES elements): a contiguous
load of packed bytes, two lookups in the 16-entry table (it stays in L1), one multiply, and a
contiguous store of the interleaved (high, low) pairs. The cast to bf16 rounds to nearest even on a GPU;
Triton's CPU interpreter truncates instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BYTES = 1024  # packed bytes per program: 2,048 weights


@triton.jit
def _dequantize_4bit(data_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BYTES + tl.arange(0, BYTES)  # bytes: elements 2j and 2j + 1
    live = 2 * j < n
    b = tl.load(data_ptr + j, mask=live, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (2 * j) // BLOCKSIZE, mask=live, other=0.0)
    hi = tl.load(code_ptr + (b >> 4)) * scale
    lo = tl.load(code_ptr + (b & 15)) * scale
    w = tl.reshape(tl.join(hi, lo), (2 * BYTES,))  # [BYTES, 2] row-major: hi0, lo0, hi1, lo1, ...
    i = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=i < n)


def dequantize_4bit(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor) -> torch.Tensor:
    """out [n] (fp32/bf16/fp16, contiguous) = the first n elements of W.flat (module docstring): one launch."""
    n = out.numel()
    if n == 0:
        return out
    if blocksize % 2 or data.numel() < -(-n // 2) or absmax.numel() < -(-n // blocksize) or code.numel() != 16:
        raise ValueError(f"4-bit parts do not cover {n} elements in blocks of {blocksize}: data {data.numel()} "
                         f"bytes, absmax {absmax.numel()}, code {code.numel()}")
    assert out.is_contiguous() and data.dtype == torch.uint8 and absmax.dtype == code.dtype == torch.float32
    _dequantize_4bit[(triton.cdiv(n, 2 * BYTES),)](data, absmax, code, out, n, BLOCKSIZE=blocksize, BYTES=BYTES)
    return out
