"""Projection weights pre-packed for oneDNN on the CPU.

F.linear hands oneDNN/MKL a plain [out, in] matrix, which they re-block into the layout their matmul
kernels read on every call: with a decode batch's few rows that copy costs as much as the product.
Packing each weight once at load (mkldnn's _reorder_linear_weight, as torch.compile's CPU freezing
does) leaves only the product: 1.3-2x the GFLOP/s of decode-sized projections in float32, 1.1-1.5x in
bfloat16 (`quiver bench roofline`), and the same maths (oneDNN's own sgemm / bf16 dot products).

In bfloat16 on an AVX512-BF16 CPU, steps of at most FEW_ROWS rows read that packed copy in place with
Quiver's own kernel (kernels/cpu_kernels.cpp), which streams it closer to the memory bandwidth, from 2 MiB
pages (server.model.huge_pages) unless --no-huge-pages.
"""
from __future__ import annotations

import functools

import torch

from quiver.kernels.ops import FEW_ROWS, blocked_linear, onednn_blocks
from quiver.server.model.huge_pages import collapse


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """On the CPU, in float32 or bfloat16, where this torch build has the mkldnn ops (tried once on a
    tiny weight: a build or CPU without them keeps plain F.linear)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    return _packing_works(dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    weight, x = torch.ones(4, 8, dtype=dtype), torch.ones(2, 8, dtype=dtype)
    try:
        probe = PackedWeight(weight, huge_pages=False)
        return bool(torch.equal(probe.linear(x, None), torch.full((2, 4), 8, dtype=dtype)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedWeight:
    """A [out, in] linear weight in oneDNN's blocked layout: linear(x, bias) = x @ W^T + bias."""

    def __init__(self, weight: torch.Tensor, huge_pages: bool = True):
        """huge_pages: the copy Quiver's kernel streams remapped onto 2 MiB pages (server.model.huge_pages; where
        the kernel does not read it, oneDNN's own pace is unmeasured on them and it stays as it is)."""
        self.shape, self.dtype = weight.shape, weight.dtype
        weight = weight.detach().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.blocks = onednn_blocks(self.packed, weight)  # None where oneDNN's layout is not the kernel's
        if huge_pages and self.blocks is not None:
            collapse([self.span])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] (contiguous) -> [T, out], in the weight's dtype."""
        if self.blocks is not None and x.shape[0] <= FEW_ROWS:
            return blocked_linear(x, self.blocks, self.shape[0], bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        """The plain [out, in] weight (a copy: for adapter loading, not for steps)."""
        return self.packed.to_dense()

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @property
    def span(self) -> tuple[int, int]:
        """(address, bytes) of the packed copy, the memory a step reads."""
        return torch.ops.mkldnn.data_ptr(self.packed), torch.ops.mkldnn._nbytes(self.packed)
