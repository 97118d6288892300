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


def attention_bias(q_start: torch.Tensor, q_lens: torch.Tensor, kv_offset: torch.Tensor, prefix_len: torch.Tensor,
                   max_q: int, num_keys: int) -> torch.Tensor:
    """[B, max_q, num_keys] additive mask (0 / -inf, float32) for prefix_paged_attention.

    Query i of row b is the row's token q_start + i; it sees the row's own tokens 0..q_start + i,
    stored from cache index kv_offset on, and the adapter's prefix keys 0..prefix_len - 1.
    Padded queries (i >= q_lens) see what the row's last real query sees.
    """
    steps = torch.arange(max_q, device=q_start.device)
    q_idx = q_start[:, None] + torch.minimum(steps[None, :], q_lens[:, None] - 1)
    key = torch.arange(num_keys, device=q_start.device)[None, None, :]
    off = kv_offset[:, None, None]
    allowed = ((key >= off) & (key - off <= q_idx[:, :, None])) | (key < prefix_len[:, None, None])
    return torch.zeros(allowed.shape, dtype=torch.float32, device=q_start.device).masked_fill_(~allowed, float("-inf"))


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len,
                           scale: float) -> torch.Tensor:
    """Attention of each row's queries over its adapter's prefix and its own paged KV (GQA).

    q: [B, Q, H, D]; caches [KV, num_blocks, bs, D]; block_tables [B, NB]; q_start, q_lens,
    kv_offset, prefix_len: [B] as in attention_bias. Keys of row b are the cache entries its
    block table lists, in order; the visible ones are given by attention_bias.
    """
    bias = attention_bias(q_start, q_lens, kv_offset, prefix_len, q.shape[1], block_tables.shape[1] * k_cache.shape[2])
    return paged_attention(q, k_cache, v_cache, block_tables, bias, scale)


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
