"""The op surface the model and the adapter families call: one implementation per device,
chosen once (ops_for), with one contract whatever the device. TorchOps is the CPU path and the
oracle (kernels.torch_ops); TritonOps runs the same maths in Triton kernels on CUDA.

Ops and their maths (T tokens, KV heads, paged cache of num_blocks blocks of bs tokens):
  write_kv(k_cache, v_cache, k, v, slot_mapping)
      k_cache, v_cache [KV, num_blocks, bs, D]; k, v [T, KV, D]; slot_mapping [T]:
      k_cache[:, s // bs, s % bs] = k[t] for s = slot_mapping[t] (the same for v).
  zero_blocks(k_cache, v_cache, blocks)
      k_cache[:, blocks] = v_cache[:, blocks] = 0 (blocks [n] int64): a block is zeroed when handed out.
  attention(q, k_cache, v_cache, group, scale) -> [B, Q, H, D]
      q [B, Q, H, D], the rows of one attention group (engine.step_inputs.AttnGroup): their block tables
      [B, NB], and either ("masked" layout) a [B, Q, NB * bs] bool mask built once per step, or ("paged")
      q_start, q_lens, kv_offset, prefix_len [B]. Query i of row b is the row's token q_start + i; it
      attends, with grouped KV heads (h -> h // (H / KV)), to the row's own keys 0..q_start + i stored from
      cache index kv_offset on and to its adapter's prefix keys at cache indices 0..prefix_len - 1, with
      softmax(scale * q.k) accumulated in float32. Queries i >= q_lens are padding.
  lora_buffers(num_slots, rank, in_features, slice_outs, dtype, device) -> LoraBuffers
      zeroed slots for one fused projection (slices of widths slice_outs), in this backend's layout.
  lora_write(buf, slot, slice, a [r, in], b_t [r, out_slice]), lora_clear(buf, slot)
      put one adapter's A and (scaled, transposed) B for one slice into a cleared slot, rank r <= R
      zero-padded (copies are non-blocking: a and b_t are pinned on CUDA); zero a slot.
  lora_apply(x [T, in], y [T, out], buf, meta)
      y[t] += B_slot (A_slot x[t]) for every token t whose slot (meta.token_slots[t]) is >= 0, each
      slice's columns from that slice's rank rows (kernels.torch_ops gives the per-token definition).
  bottleneck_apply(z, y, down, down_b, up, up_b, acts, meta)
      y[t] += up[s]^T act_s(down[s] z[t] + down_b[s]) + up_b[s] for s = slot of t >= 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quiver.kernels import torch_ops
from quiver.kernels.meta import LoraMeta


@dataclass
class LoraBuffers:
    """One fused projection's LoRA slots. a [L, S*R, in] in every backend; b is [L, S*R, out]
    block-diagonal for TorchOps and [L, R, out] for TritonOps; offsets are the slices' bounds."""
    a: torch.Tensor
    b: torch.Tensor
    offsets: tuple[int, ...]
    rank: int
    # TorchOps: (a[slot].T, b[slot]) made once, for steps whose tokens all use one adapter (two
    # matmuls, no per-call view ops)
    slot_views: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class TorchOps:
    name = "torch"
    attention_layout = "masked"  # the step builder makes each group's mask once per step

    write_kv = staticmethod(torch_ops.write_kv)
    zero_blocks = staticmethod(torch_ops.zero_blocks)
    bottleneck_apply = staticmethod(torch_ops.bottleneck_apply)

    @staticmethod
    def attention(q, k_cache, v_cache, group, scale: float) -> torch.Tensor:
        return torch_ops.paged_attention(q, k_cache, v_cache, group.block_tables, group.allowed, scale)

    def lora_buffers(self, num_slots: int, rank: int, in_features: int, slice_outs: list[int], dtype,
                     device) -> LoraBuffers:
        offsets = tuple(sum(slice_outs[:k]) for k in range(len(slice_outs) + 1))
        a = torch.zeros(num_slots, len(slice_outs) * rank, in_features, dtype=dtype, device=device)
        b = torch.zeros(num_slots, self._b_rows(len(slice_outs), rank), offsets[-1], dtype=dtype, device=device)
        return LoraBuffers(a, b, offsets, rank, self._slot_views(a, b))

    @staticmethod
    def _b_rows(num_slices: int, rank: int) -> int:
        return num_slices * rank  # block-diagonal: slice s's rows at s*R..

    @staticmethod
    def _slot_views(a, b) -> list:
        return [(a[s].T, b[s]) for s in range(a.shape[0])]

    @staticmethod
    def _b_row(slice_index: int, rank: int) -> int:
        return slice_index * rank

    def lora_write(self, buf: LoraBuffers, slot: int, slice_index: int, a: torch.Tensor, b_t: torch.Tensor) -> None:
        r, rank = a.shape[0], buf.rank
        lo, hi = buf.offsets[slice_index], buf.offsets[slice_index + 1]
        buf.a[slot, slice_index * rank:slice_index * rank + r].copy_(a, non_blocking=True)
        row = self._b_row(slice_index, rank)
        buf.b[slot, row:row + r, lo:hi].copy_(b_t, non_blocking=True)

    @staticmethod
    def lora_clear(buf: LoraBuffers, slot: int) -> None:
        buf.a[slot].zero_()
        buf.b[slot].zero_()

    @staticmethod
    def lora_apply(x: torch.Tensor, y: torch.Tensor, buf: LoraBuffers, meta: LoraMeta) -> None:
        if meta.single_slot is not None:  # every token uses one adapter: y += (x A^T) B
            a_t, b = buf.slot_views[meta.single_slot]
            y.addmm_(torch.mm(x, a_t), b)
            return
        torch_ops.lora_apply(x, y, buf.a, buf.b, meta, buf.offsets)


class TritonOps(TorchOps):
    name = "triton"
    attention_layout = "paged"

    @staticmethod
    def attention(q, k_cache, v_cache, group, scale: float) -> torch.Tensor:
        from quiver.kernels.attention_triton import prefix_paged_attention
        return prefix_paged_attention(q, k_cache, v_cache, group.block_tables, group.q_start, group.q_lens,
                                      group.kv_offset, group.prefix_len, scale, tiles=group.m_tiles)

    @staticmethod
    def _b_rows(num_slices: int, rank: int) -> int:
        return rank  # every slice's rank rows at 0..R, each over its own columns

    @staticmethod
    def _slot_views(a, b) -> list:
        return []

    @staticmethod
    def _b_row(slice_index: int, rank: int) -> int:
        return 0

    @staticmethod
    def lora_apply(x: torch.Tensor, y: torch.Tensor, buf: LoraBuffers, meta: LoraMeta) -> None:
        from quiver.kernels import lora_triton
        lora_triton.lora_apply(x, y, buf.a, buf.b, buf.offsets, meta)


BACKENDS = {"torch": TorchOps, "triton": TritonOps}


def ops_for(device: torch.device | str, backend: str = "auto") -> TorchOps:
    """The ops for `device`: Triton on CUDA, torch elsewhere, unless `backend` names one."""
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return BACKENDS[backend]()
