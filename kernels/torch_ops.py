"""Every kernel op in plain PyTorch: the CPU path, and the oracle for the Triton kernels.

kernels.ops says which op is which and chooses between these and the Triton ops once per device.

Batched multi-LoRA, for one fused projection with S slices (q/k/v: S = 3; gate/up: 2; o, down: 1):
  x [T, in], a [L, S*R, in], b [L, R, out_total], slice offsets o_0 = 0 < ... < o_S = out_total.
lora_shrink:  xa[t] = a[slot[t]] @ x[t]                                     ([T, S*R]; 0 where slot = -1)
lora_expand:  y[t, o_s:o_{s+1}] += xa[t, s*R:(s+1)*R] @ b[slot[t], :, o_s:o_{s+1}]   for each slice s
(b is stored [R, out] so that each slice's columns are read as plain row-major blocks.)
Ranks below R are zero-padded in a and b, so they contribute exactly nothing.
The CPU path keeps b block-diagonal instead, [L, S*R, out_total] (see block_diagonal): the
expand of every slice is then one matmul, y += xa @ b[slot], and tiny decode steps pay for two
matmuls per projection rather than 1 + S.

Batched bottleneck adapters: for each token t with adapter slot s = slot[t] >= 0,
  y[t] += up[s]^T act_s(down[s] z[t] + down_b[s]) + up_b[s]
with down [L, m, hidden], down_b [L, m], up [L, m, hidden] (stored [m, out] like LoRA's b),
up_b [L, hidden], and act_s the slot's non-linearity. Grouping comes from the same per-step
metadata as LoRA (kernels.torch_meta), so each step runs one bmm pair for all adapters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quiver.kernels.torch_meta import TorchAdapterMeta, add_padded_rows, attention_mask, padded_rows


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values in the paged cache.

    k_cache, v_cache: [KV, num_blocks, block_size, D]; k, v: [T, KV, D]; slot_mapping: [T]
    with slot = block * block_size + offset. Afterwards k_cache[:, s // bs, s % bs] = k[t].
    """
    kv, nb, bs, d = k_cache.shape
    k_cache.view(kv, nb * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(kv, nb * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1))


def zero_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor) -> None:
    """k_cache[:, blocks] = v_cache[:, blocks] = 0: blocks handed out hold nothing of a former owner."""
    k_cache.index_fill_(1, blocks, 0)
    v_cache.index_fill_(1, blocks, 0)


# queries per row up to which paged_attention uses batched matmuls (decode steps) instead of the
# fused SDPA kernel, whose CPU code is tuned for long query blocks (and is slow in bfloat16 for single queries)
FEW_QUERIES = 4
SOFTCAP_SCORES = 1 << 24  # scores (fp32) one soft-capped attention chunk may hold


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    allowed: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of padded query rows over their own paged KV, with grouped KV heads.

    q: [B, Q, H, D]; k_cache, v_cache: [KV, num_blocks, bs, D]; block_tables: [B, NB]; allowed:
    [B, Q, L] bool, L = NB * bs. With g = H // KV, K_b = concat over n of k_cache[:, block_tables[b, n]]:
      out[b, i, h] = softmax_j(cap(scale * q[b, i, h] . K_b[h // g, j]), over j with allowed[b, i, j]) @ V_b[h // g],
    cap(s) = softcap · tanh(s / softcap) with a softcap (Gemma 2), else s. A softcap takes the batched
    matmuls in query chunks of at most SOFTCAP_SCORES scores (SDPA has no soft-cap).
    Long query blocks take one fused scaled_dot_product_attention (its CPU kernel works through the
    keys in tiles: memory of the order of the mask, not of the scores); up to FEW_QUERIES queries per
    row take few_query_attention. Both accumulate in float32. Keys a row may not see must hold finite
    values (padding points at an always-zero block; blocks are zeroed when handed out), since a masked
    weight of 0 times NaN is still NaN. Returns [B, Q, H, D].
    """
    b, nq, h, d = q.shape
    kv, nb, bs, _ = k_cache.shape
    length = block_tables.shape[1] * bs
    flat = block_tables.reshape(-1)
    # whole blocks as rows of a 3-d view: index_select on the 4-d cache is several times slower on CPU
    keys = k_cache.view(kv, nb, bs * d).index_select(1, flat).view(kv, b, length, d)
    values = v_cache.view(kv, nb, bs * d).index_select(1, flat).view(kv, b, length, d)
    if softcap is not None:
        chunk = max(1, SOFTCAP_SCORES // (b * h * length))
        return torch.cat([few_query_attention(q[:, i:i + chunk], keys, values, allowed[:, i:i + chunk], scale, softcap)
                          for i in range(0, nq, chunk)], dim=1)
    if nq <= FEW_QUERIES:
        return few_query_attention(q, keys, values, allowed, scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=allowed[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def few_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                        scale: float, softcap: float | None = None) -> torch.Tensor:
    """paged_attention's maths as two batched matmuls, for rows of a few queries (decode).

    q [B, Q, H, D]; keys, values [KV, B, L, D] (gathered); allowed [B, Q, L]. The g = H // KV query
    heads of one KV head and the row's Q queries form one [g*Q, D] block, so each (KV head, row) pair is
    one [g*Q, D] x [D, L] product. As in transformers' eager attention, q.K is taken in the cache's dtype
    (accumulated in float32 by the matmul), the softmax in float32, and the probabilities meet V in its
    dtype. Returns [B, Q, H, D]."""
    b, nq, h, d = q.shape
    kv, _, length, _ = keys.shape
    g = h // kv
    qg = q.view(b, nq, kv, g, d).permute(2, 0, 3, 1, 4).reshape(kv * b, g * nq, d)
    scores = torch.bmm(qg, keys.reshape(kv * b, length, d).transpose(1, 2)).float()
    scores.mul_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores.view(kv, b, g, nq, length).masked_fill_(~allowed[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.bmm(probs, values.reshape(kv * b, length, d))
    return out.view(kv, b, g, nq, d).permute(1, 3, 0, 2, 4).reshape(b, nq, h, d)


def prefix_paged_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_offset, prefix_len,
                           scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of each row's queries over its adapter's prefix and its own paged KV (GQA): the
    oracle for the kernels. q: [B, Q, H, D]; caches [KV, num_blocks, bs, D]; block_tables [B, NB];
    q_start, q_lens, kv_offset, prefix_len: [B], window as attention_mask takes them, softcap as
    paged_attention. Keys a row may not see are zeroed first (in a copy), so the oracle holds whatever
    the cache holds."""
    bs = k_cache.shape[2]
    allowed = attention_mask(q_start, q_lens, kv_offset, prefix_len, q.shape[1], block_tables.shape[1] * bs,
                             window)
    visible = allowed.any(dim=1)  # [B, L]
    kv, _, _, d = k_cache.shape
    flat = block_tables.reshape(-1)
    b, length = block_tables.shape[0], block_tables.shape[1] * bs
    keys = k_cache.index_select(1, flat).view(kv, b, length, d).where(visible[None, :, :, None], 0)
    values = v_cache.index_select(1, flat).view(kv, b, length, d).where(visible[None, :, :, None], 0)
    rows = torch.arange(b * block_tables.shape[1]).view(b, -1)  # the gathered copy, one block per entry
    return paged_attention(q, keys.reshape(kv, -1, bs, d), values.reshape(kv, -1, bs, d), rows, allowed, scale,
                           softcap)


# ---- batched LoRA ---------------------------------------------------------------------------


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot >= 0:
            rows = (token_slots == slot).nonzero().squeeze(1)
            out[rows] = x[rows] @ a[slot].T
    return out


def lora_expand_ref(xa: torch.Tensor, b: torch.Tensor, offsets: tuple[int, ...], token_slots: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    rank = b.shape[1]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for s in range(len(offsets) - 1):
            lo, hi = offsets[s], offsets[s + 1]
            y[rows, lo:hi] += xa[rows, s * rank:(s + 1) * rank] @ b[slot, :, lo:hi]
    return y


def block_diagonal(b: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """[L, R, out] -> [L, S*R, out]: slice s's rank rows moved to rows s*R.., zeros elsewhere."""
    n_slices, rank = len(offsets) - 1, b.shape[1]
    out = b.new_zeros(b.shape[0], n_slices * rank, b.shape[2])
    for s in range(n_slices):
        lo, hi = offsets[s], offsets[s + 1]
        out[:, s * rank:(s + 1) * rank, lo:hi] = b[:, :, lo:hi]
    return out


# slices at least this wide are expanded one by one: the block-diagonal's zeros then cost more than a call
WIDE_SLICES = 1024


def _expand(xa: torch.Tensor, y: torch.Tensor, b: torch.Tensor, offsets: tuple[int, ...]) -> None:
    """y [n, m, out] += xa [n, m, S*R] @ b [n, S*R, out] (block-diagonal), slice by slice when they are wide."""
    widths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    if len(widths) == 1 or min(widths) < WIDE_SLICES:
        y.baddbmm_(xa, b)
        return
    rank = xa.shape[2] // len(widths)
    for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        y[:, :, lo:hi].baddbmm_(xa[:, :, s * rank:(s + 1) * rank], b[:, s * rank:(s + 1) * rank, lo:hi])


def lora_apply(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: TorchAdapterMeta,
               offsets: tuple[int, ...]) -> None:
    """y += the LoRA delta of every token, b block-diagonal ([L, S*R, out]).

    Padded form: one bmm pair over all slots at once (decode-like steps), added in place when
    the rows are contiguous (wide slices, gate/up, each expanded on its own block). Segmented form: one matmul pair per adapter segment (prefill-like
    steps, few long segments), on slices of x and y when the segments are in token order, each
    slice's expand on its own block of b (the zeros of the block-diagonal cost these the most).
    """
    if meta.padded:
        lo, n, m = meta.slot_lo, meta.num_slots, meta.max_len
        if meta.contiguous_from is not None:  # no padding, no gather: accumulate straight into y
            rows = slice(meta.contiguous_from, meta.contiguous_from + n * m)
            if n == 1:
                y[rows].addmm_(x[rows] @ a[lo].T, b[lo])
            else:
                xa = torch.bmm(x[rows].view(n, m, -1), a[lo:lo + n].transpose(1, 2))
                _expand(xa, y[rows].view(n, m, -1), b[lo:lo + n], offsets)
            return
        xa = torch.bmm(padded_rows(x, meta), a[lo:lo + n].transpose(1, 2))
        if meta.pad_mask is not None:
            xa.masked_fill_(~meta.pad_mask, 0)
        add_padded_rows(y, torch.bmm(xa, b[lo:lo + n]), meta)
        return
    if meta.segments_from is not None:  # segments in token order: plain slices
        rank = a.shape[1] // (len(offsets) - 1)
        for slot, start, n in meta.segments:
            rows = slice(meta.segments_from + start, meta.segments_from + start + n)
            xa = x[rows] @ a[slot].T
            for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
                y[rows, lo:hi].addmm_(xa[:, s * rank:(s + 1) * rank], b[slot, s * rank:(s + 1) * rank, lo:hi])
        return
    for slot, start, n in meta.segments:
        rows = meta.seg_index[start:start + n]
        y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].T) @ b[slot])


# ---- batched bottleneck adapters ------------------------------------------------------------

ACTIVATIONS = {
    "relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "leakyrelu": F.leaky_relu,
}


def _activate(h: torch.Tensor, acts: list[str], lo: int, kind_of: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """h: [n, rows, m] for slots lo..lo+n-1, slot i using acts[i]; kind_of[kind]: [slots] bool on h's
    device, which slots use that kind (no host-to-device copy inside the forward)."""
    kinds = set(acts[lo:lo + h.shape[0]])
    if len(kinds) == 1:
        return ACTIVATIONS[kinds.pop()](h)
    out = torch.zeros_like(h)
    for kind in kinds:
        out = torch.where(kind_of[kind][lo:lo + h.shape[0], None, None], ACTIVATIONS[kind](h), out)
    return out


def bottleneck_apply(z, y, down, down_b, up, up_b, acts: list[str], meta: TorchAdapterMeta,
                     kind_of: dict[str, torch.Tensor] | None = None) -> None:
    if meta.padded:
        lo, n = meta.slot_lo, meta.num_slots
        h = torch.baddbmm(down_b[lo:lo + n, None, :], padded_rows(z, meta), down[lo:lo + n].transpose(1, 2))
        d = torch.baddbmm(up_b[lo:lo + n, None, :], _activate(h, acts, lo, kind_of), up[lo:lo + n])
        if meta.pad_mask is not None:  # biases make padding rows non-zero
            d.masked_fill_(~meta.pad_mask, 0)
        add_padded_rows(y, d, meta)
        return
    for slot, start, n in meta.segments:
        rows = meta.seg_index[start:start + n]
        h = torch.addmm(down_b[slot], z.index_select(0, rows), down[slot].T)
        y.index_add_(0, rows, torch.addmm(up_b[slot], ACTIVATIONS[acts[slot]](h), up[slot]))
