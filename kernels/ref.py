"""Every kernel op in plain PyTorch: the CPU path, and the oracle for the Triton kernels."""
from __future__ import annotations

import torch


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values in the paged cache.

    k_cache, v_cache: [KV, num_blocks, block_size, D]; k, v: [T, KV, D]; slot_mapping: [T]
    with slot = block * block_size + offset. Afterwards k_cache[:, s // bs, s % bs] = k[t].
    """
    kv, nb, bs, d = k_cache.shape
    k_cache.view(kv, nb * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(kv, nb * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, attn_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of padded query rows over their own paged KV, with grouped KV heads.

    q: [B, Q, H, D]; k_cache, v_cache: [KV, num_blocks, bs, D]; block_tables: [B, NB];
    attn_bias: [B, Q, L] additive (0 or -inf), L = NB * bs. With g = H // KV,
    K_b = concat over n of k_cache[:, block_tables[b, n]] (so key j of row b is K_b[:, j]) and
    out[b, i, h] = softmax_j(scale * q[b, i, h] . K_b[h // g, j] + attn_bias[b, i, j]) @ V_b[h // g].
    The softmax runs in float32. Returns [B, Q, H, D].
    """
    b, nq, h, d = q.shape
    kv, _, bs, _ = k_cache.shape
    g = h // kv
    length = block_tables.shape[1] * bs
    flat = block_tables.reshape(-1)
    keys = k_cache.index_select(1, flat).view(kv, b, length, d)
    values = v_cache.index_select(1, flat).view(kv, b, length, d)
    qh = q.view(b, nq, kv, g, d).permute(2, 0, 1, 3, 4).reshape(kv, b, nq * g, d)
    scores = torch.matmul(qh, keys.transpose(-1, -2)).view(kv, b, nq, g, length)
    scores = scores.float().mul_(scale).add_(attn_bias[None, :, :, None, :])
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(kv, b, nq * g, length)
    out = torch.matmul(probs, values)  # [KV, B, Q*g, D]
    return out.view(kv, b, nq, g, d).permute(1, 2, 0, 3, 4).reshape(b, nq, h, d)
