"""Attention dispatch: the PyTorch reference on CPU, the Triton kernel on CUDA."""
from __future__ import annotations

from . import ref


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len, scale):
    """See kernels.ref.prefix_paged_attention for the maths."""
    if q.is_cuda:
        from .attention_triton import prefix_paged_attention as triton_attention
        return triton_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len, scale)
    return ref.prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len, scale)
