"""The op surface the model and the adapter families call: one protocol (Ops), two implementations chosen
once per device (ops_for): TorchOps, the CPU path and the oracle (kernels.torch_ops), and TritonOps, the
same maths in Triton kernels on CUDA. Each builds the per-step metadata its kernels read (attention_meta,
lora_meta, bottleneck_meta: host tensors, sent to the device with the step's one copy), so no caller ever
asks which backend it has.

Shapes: T tokens in the step, H query heads, KV key/value heads, D head dim, a paged cache of num_blocks
blocks of bs tokens, L adapter slots, R the largest LoRA rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from quiver.kernels import cpu_kernels, torch_ops
from quiver.kernels.cpu_kernels import ACT_KINDS, FEW_ROWS, cache_root, onednn_blocks, serves
from quiver.kernels.cpu_kernels import act_mul as cpu_act_mul
from quiver.kernels.cpu_kernels import DecodePlan, decode_layers as fused_decode_layers
from quiver.kernels.cpu_kernels import linear as blocked_linear
from quiver.kernels.cpu_kernels import rms_norm as cpu_rms_norm
from quiver.kernels.cpu_kernels import rope as cpu_rope
from quiver.kernels.grouping import ROW_TILE, attend_groups
from quiver.kernels.torch_ops import FEW_QUERIES
from quiver.kernels.torch_meta import FewTokenMeta, TorchAdapterMeta, masked_attention_meta, torch_adapter_meta
from quiver.kernels.triton_meta import PagedAttention, TritonLoraMeta, paged_attention_meta, triton_lora_meta


@dataclass
class LoraBuffers:
    """One fused projection's LoRA slots, in its backend's layout: a [L, S*R, in] in both; b [L, S*R, out]
    block-diagonal for TorchOps, [L, R, out] for TritonOps; offsets are the S slices' column bounds."""
    a: torch.Tensor
    b: torch.Tensor
    offsets: tuple[int, ...]
    rank: int
    # TorchOps: (a[slot].T, b[slot]) made once, for steps whose tokens all use one adapter
    slot_views: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # TorchOps in bfloat16 where the C++ kernels serve: b again as [L, ceil(out / 64), S*R, 64], each 64 output
    # columns' rows side by side: the one-call decode loop (server.model.fused) expands a block from one
    # contiguous run, where b's rows lie a whole output row apart
    b_blocks: torch.Tensor | None = None


class Ops(Protocol):
    name: str

    def write_kv(self, k_cache, v_cache, k, v, slot_mapping) -> None:
        """k_cache, v_cache [KV, num_blocks, bs, D]; k, v [T, KV, D]; slot_mapping [T]:
        k_cache[:, s // bs, s % bs] = k[t] for s = slot_mapping[t] (the same for v)."""

    def zero_blocks(self, k_cache, v_cache, blocks) -> None:
        """k_cache[:, blocks] = v_cache[:, blocks] = 0 (blocks [n] int64): a block is zeroed when handed out."""

    def attention_meta(self, layout, heads_per_kv: int, windows: tuple[int, ...] = ()) -> list:
        """The step's attention groups from its rows (layout: engine.step.RowLayout, host tensors), for
        every sliding window in `windows` as well as full attention."""

    def attention(self, q, k_cache, v_cache, meta: list, scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
        """q [T, H, D] -> [T, H, D]. Token t of row b, the row's token p, attends, with grouped KV heads
        (h -> h // (H / KV)), to the row's own keys 0..p stored from cache index kv_offset[b] on and to
        its adapter's prefix keys at cache indices 0..prefix_len[b] - 1 (through the row's block table),
        with softmax(cap(scale * q.k)) accumulated in float32, cap(s) = softcap · tanh(s / softcap) when a
        softcap is given. A sliding window W keeps keys less than W positions back, the prefix's key j
        standing at position j - prefix_len[b] (kernels.torch_meta.attention_mask)."""

    def lora_buffers(self, num_slots: int, rank: int, in_features: int, slice_outs: list[int], dtype,
                     device) -> LoraBuffers:
        """Zeroed slots for one fused projection (slices of widths slice_outs)."""

    def lora_write(self, buf: LoraBuffers, slot: int, slice_index: int, a, b_t) -> None:
        """Put one adapter's A [r, in] and (scaled, transposed) B^T [r, out_slice] for one slice into a cleared
        slot, rank r <= R zero-padded (non-blocking copies: a and b_t are pinned on CUDA)."""

    def lora_clear(self, buf: LoraBuffers, slot: int) -> None:
        """Zero a slot."""

    def lora_meta(self, token_slots: torch.Tensor):
        """token_slots [T] int64 (-1: no adapter) -> what lora_apply reads, None when no token has one."""

    def lora_apply(self, x, y, buf: LoraBuffers, meta) -> None:
        """x [T, in], y [T, out]: y[t] += B_s (A_s x[t]) for every token t of slot s >= 0, each slice's columns
        from that slice's rank rows (kernels.torch_ops gives the per-token definition)."""

    def bottleneck_meta(self, token_slots: torch.Tensor):
        """token_slots [T] int64 (-1: no adapter) -> what bottleneck_apply reads, None when no token has one."""

    def bottleneck_apply(self, z, y, down, down_b, up, up_b, acts: list[str], meta, kind_of) -> None:
        """z, y [T, hidden]: y[t] += up[s]^T act_s(down[s] z[t] + down_b[s]) + up_b[s] for s = slot of t >= 0
        (down [L, m, hidden], down_b [L, m], up [L, m, hidden], up_b [L, hidden])."""


def _write_slot(buf: LoraBuffers, slot: int, slice_index: int, a, b_t, b_row: int) -> None:
    r, rank = a.shape[0], buf.rank
    lo, hi = buf.offsets[slice_index], buf.offsets[slice_index + 1]
    buf.a[slot, slice_index * rank:slice_index * rank + r].copy_(a, non_blocking=True)
    buf.b[slot, b_row:b_row + r, lo:hi].copy_(b_t, non_blocking=True)
    if buf.b_blocks is not None:  # the slice's rows hold nothing outside lo..hi (B is block-diagonal)
        blocks = buf.b_blocks.shape[1]
        wide = buf.b.new_zeros(r, blocks * cpu_kernels.BLOCK)
        wide[:, lo:hi] = b_t
        buf.b_blocks[slot, :, b_row:b_row + r].copy_(wide.view(r, blocks, cpu_kernels.BLOCK).transpose(0, 1))


def _clear_slot(buf: LoraBuffers, slot: int) -> None:
    for t in (buf.a, buf.b, buf.b_blocks):
        if t is not None:
            t[slot].zero_()


def _buffers(num_slots: int, rank: int, in_features: int, slice_outs: list[int], b_rows: int, dtype,
             device) -> LoraBuffers:
    """Zeroed a [L, S*R, in] and b [L, b_rows, out]."""
    offsets = tuple(sum(slice_outs[:k]) for k in range(len(slice_outs) + 1))
    a = torch.zeros(num_slots, len(slice_outs) * rank, in_features, dtype=dtype, device=device)
    return LoraBuffers(a, torch.zeros(num_slots, b_rows, offsets[-1], dtype=dtype, device=device), offsets, rank)


class TorchOps:
    """Masked attention groups (a mask built once per step); LoRA's B block-diagonal, so the expand of every
    slice is one matmul and tiny decode steps pay two matmuls per projection rather than 1 + S.

    On the CPU, where Quiver's C++ kernels are built (kernels.cpu_kernels), the KV write, attention groups of
    at most FEW_QUERIES queries a row (decode) and the LoRA of steps of at most FEW_ROWS tokens take them
    instead: the same maths (and roundings), one op each, the cache and slot buffers read in place."""
    name = "torch"
    zero_blocks = staticmethod(torch_ops.zero_blocks)
    lora_clear = staticmethod(_clear_slot)

    @staticmethod
    def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
        (cpu_kernels.write_kv_ if serves(k) else torch_ops.write_kv)(k_cache, v_cache, k, v, slot_mapping)

    @staticmethod
    def attention_meta(layout, heads_per_kv: int, windows: tuple[int, ...] = ()) -> list:
        return masked_attention_meta(layout, windows)

    @staticmethod
    def attention(q, k_cache, v_cache, meta: list, scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
        few = serves(q)
        return attend_groups(q, meta, lambda qg, g: (
            cpu_kernels.paged_attention if few and qg.shape[1] <= FEW_QUERIES else torch_ops.paged_attention
        )(qg, k_cache, v_cache, g.block_tables, g.mask(window), scale, softcap))

    @staticmethod
    def lora_buffers(num_slots: int, rank: int, in_features: int, slice_outs: list[int], dtype,
                     device) -> LoraBuffers:
        buf = _buffers(num_slots, rank, in_features, slice_outs, len(slice_outs) * rank, dtype, device)
        buf.slot_views = [(buf.a[s].T, buf.b[s]) for s in range(num_slots)]
        if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and cpu_kernels.fast():
            out, rows = buf.b.shape[2], buf.b.shape[1]
            buf.b_blocks = torch.zeros(num_slots, -(-out // cpu_kernels.BLOCK), rows, cpu_kernels.BLOCK, dtype=dtype)
        return buf

    @staticmethod
    def lora_write(buf: LoraBuffers, slot: int, slice_index: int, a, b_t) -> None:
        _write_slot(buf, slot, slice_index, a, b_t, slice_index * buf.rank)  # slice s's rows at s*R..

    @staticmethod
    def lora_meta(token_slots: torch.Tensor) -> TorchAdapterMeta | FewTokenMeta | None:
        if token_slots.numel() <= FEW_ROWS and serves(token_slots):
            return FewTokenMeta(token_slots)
        return torch_adapter_meta(token_slots)

    @staticmethod
    def lora_apply(x, y, buf: LoraBuffers, meta: TorchAdapterMeta) -> None:
        if meta.token_slots is not None and serves(x):
            cpu_kernels.lora_add_(y, x, buf.a, buf.b, meta.token_slots, buf.offsets, buf.rank)
            return
        if meta.single_slot is not None:  # one adapter: y += (x A^T) B, base rows' x A^T zeroed
            a_t, b = buf.slot_views[meta.single_slot]
            xa = torch.mm(x, a_t)
            if meta.base_rows is not None:
                xa.masked_fill_(meta.base_rows, 0)
            y.addmm_(xa, b)
            return
        torch_ops.lora_apply(x, y, buf.a, buf.b, meta, buf.offsets)

    bottleneck_meta = staticmethod(torch_adapter_meta)
    bottleneck_apply = staticmethod(torch_ops.bottleneck_apply)


class TritonOps:
    """Paged attention over the flat tokens, one launch walking each row's keys itself, split-KV when a
    launch is too small for the GPU (kernels.attention_triton); SGMV/BGMV LoRA over B
    stored [L, R, out], every slice's rank rows at 0..R over its own columns (kernels.lora_triton).
    Bottleneck adapters take the torch op on every device."""
    name = "triton"
    write_kv = staticmethod(torch_ops.write_kv)
    zero_blocks = staticmethod(torch_ops.zero_blocks)
    lora_clear = staticmethod(_clear_slot)

    @staticmethod
    def attention_meta(layout, heads_per_kv: int, windows: tuple[int, ...] = ()) -> list:
        return paged_attention_meta(layout, heads_per_kv)

    @staticmethod
    def attention(q, k_cache, v_cache, meta: list[PagedAttention], scale: float, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
        from quiver.kernels.attention_triton import kv_splits, prefix_paged_attention

        (m,) = meta  # one launch over the flat tokens: no padded gather, no scatter
        # a tile's queries span at most ROW_TILE positions, so a window bounds the keys it walks
        keys = m.max_keys if window is None else min(m.max_keys, window + ROW_TILE)
        splits = kv_splits(m.tiles.shape[0] * k_cache.shape[0], keys)
        return prefix_paged_attention(q, k_cache, v_cache, m.block_tables, m.q_offset, m.q_start, m.q_lens,
                                      m.kv_offset, m.prefix_len, scale, tiles=m.tiles, splits=splits, window=window,
                                      softcap=softcap)

    @staticmethod
    def lora_buffers(num_slots: int, rank: int, in_features: int, slice_outs: list[int], dtype,
                     device) -> LoraBuffers:
        return _buffers(num_slots, rank, in_features, slice_outs, rank, dtype, device)

    @staticmethod
    def lora_write(buf: LoraBuffers, slot: int, slice_index: int, a, b_t) -> None:
        _write_slot(buf, slot, slice_index, a, b_t, 0)

    @staticmethod
    def lora_meta(token_slots: torch.Tensor) -> TritonLoraMeta | None:
        return triton_lora_meta(token_slots)

    @staticmethod
    def lora_apply(x, y, buf: LoraBuffers, meta: TritonLoraMeta) -> None:
        from quiver.kernels import lora_triton

        lora_triton.lora_apply(x, y, buf.a, buf.b, buf.offsets, meta)

    bottleneck_meta = staticmethod(torch_adapter_meta)
    bottleneck_apply = staticmethod(torch_ops.bottleneck_apply)


BACKENDS = {"torch": TorchOps, "triton": TritonOps}


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N] whether each row of logits [N, V] is all finite."""
    # amax and amin propagate NaN: two vectorised reductions, several times cheaper than isfinite(logits)
    return torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))


def greedy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> (each row's argmax, the first of equal maxima; finite_rows(logits)), in one pass
    on the CPU where Quiver's kernels are built."""
    if logits.dtype == torch.float32 and serves(logits):
        return cpu_kernels.greedy(logits)
    return logits.argmax(dim=-1), finite_rows(logits)


def ops_for(device: torch.device | str, backend: str = "auto") -> Ops:
    """The ops for `device`: Triton on CUDA, torch elsewhere, unless `backend` names one."""
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return BACKENDS[backend]()


def dequantize_4bit(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight into out [n] (fp32/bf16/fp16) in one Triton launch (kernels.nf4_triton):
    out[i] = code[q[i]] * absmax[i // blocksize], q[i] the high nibble of data[i // 2] for even i, the low
    for odd; data uint8 [⌈n/2⌉], absmax fp32 [⌈n/blocksize⌉], code fp32 [16]."""
    from quiver.kernels.nf4_triton import dequantize_4bit as kernel

    return kernel(data, absmax, code, blocksize, out)
