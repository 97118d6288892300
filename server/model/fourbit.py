"""Base projections kept in bitsandbytes' 4-bit format (NF4 or FP4, with or without double
quantization) and dequantized inside the step, tile by tile, into one shared scratch: the model stays
4-bit in memory and computes exactly what bitsandbytes' fp32 path computes (dequantize, then matmul).

The format, as transformers saves it: a weight W [out, in], flattened row-major, is cut into blocks of
`blocksize` (64) elements; element i is a 4-bit index q[i] into a 16-entry table `code` (the NF4 or FP4
values), two per byte with the even element in the high nibble; each block has one scale:

    W.flat[i] = code[q[i]] * absmax[i // blocksize]

With double quantization absmax is itself stored as 8-bit codes a[j] in blocks of 256:
absmax[j] = code2[a[j]] * nested_absmax[j // 256] + offset. We expand absmax to fp32 once at load (one
float per 64 weights, 1/8 of the packed bytes), so a tile costs a byte-pair lookup and one multiply.

That tile-by-tile torch path is the CPU's. On CUDA (Scratch's "triton" backend) a fused weight is
dequantized whole, one Triton launch per projection (kernels.ops.dequantize_4bit), straight into the
compute dtype, then one cuBLAS matmul: thousands of small launches per layer become a handful.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quiver.kernels.ops import dequantize_4bit

QUANT_TYPES = ("nf4", "fp4")
TILE_ELEMENTS = 1 << 18  # weights dequantized at once: 1 MiB of fp32 and 1 MiB of index, kept in cache
# on the Triton path: the largest fused projection of Llama-3-8B (gate/up, 117M) whole; a larger one (a 4-bit
# head, 70B's gate/up) goes in a few row tiles, so the scratch stays at most 256 MiB in bf16
TRITON_TILE_ELEMENTS = 1 << 27


@dataclass
class Packed4bit:
    """One projection [out, in]: data uint8 [out·in/2], absmax fp32 [out·in/blocksize], code fp32 [16]."""
    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    quant_type: str
    double_quant: bool

    def __post_init__(self):
        # byte b -> (code[b >> 4], code[b & 15]) as two fp32 in one float64: one lookup per byte
        hi, lo = self.code.repeat_interleave(16), self.code.repeat(16)
        self.pairs = torch.stack([hi, lo], -1).contiguous().view(torch.float64).view(-1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.absmax, self.code, self.pairs))

    def to(self, device) -> "Packed4bit":
        return Packed4bit(self.data.to(device), self.absmax.to(device), self.code.to(device), self.blocksize,
                          self.shape, self.quant_type, self.double_quant)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] fp32, freshly allocated (for DoRA's norms and merging, never on the step)."""
        n = self.shape[0] * self.shape[1]
        out = torch.empty(n + 1, dtype=torch.float32, device=self.data.device)
        self.dequantize_rows(0, self.shape[0], out, torch.empty(-(-n // 2), dtype=torch.int64, device=out.device))
        return out[:n].view(self.shape)

    def dequantize_rows(self, r0: int, r1: int, out: torch.Tensor, index: torch.Tensor) -> None:
        """Rows r0..r1 of W into out[:(r1 - r0)·in] (fp32; with an odd count, out[(r1 - r0)·in] is
        overwritten too); index: int64 scratch of half that. r0·in must be a multiple of blocksize
        (Weight4bit's tiles are)."""
        n_in, bs = self.shape[1], self.blocksize
        a, b = r0 * n_in, r1 * n_in
        pairs = -(-(b - a) // 2)
        index = index[:pairs]
        index.copy_(self.data[a // 2:a // 2 + pairs])
        torch.index_select(self.pairs, 0, index, out=out[:2 * pairs].view(torch.float64))
        full = (b - a) // bs * bs
        out[:full].view(-1, bs).mul_(self.absmax[a // bs:a // bs + full // bs, None])
        if full < b - a:  # a last, partial block (only when out·in is not a multiple of blocksize)
            out[full:b - a].mul_(self.absmax[(a + full) // bs])

    def dequantize_into(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows r0..r1 of W into out [(r1 - r0)·in], in out's dtype, in one Triton launch (r0·in a multiple
        of blocksize, as for dequantize_rows)."""
        a, bs = r0 * self.shape[1], self.blocksize
        dequantize_4bit(self.data[a // 2:], self.absmax[a // bs:], self.code, bs, out)


@dataclass
class Rows4bit:
    """One Packed4bit's W [out, in] as `dtype`, dequantized a block of rows at a time: narrow(0, r0, n) is a
    fresh [n, in] tensor, the values of dequantize().to(dtype)[r0:r0 + n]. DoRA's norms read a 4-bit base
    this way (narrow is the one tensor method they use), so that loading an adapter never holds a full
    fp32 W."""
    part: Packed4bit
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.part.shape

    @property
    def device(self) -> torch.device:
        return self.part.data.device

    def narrow(self, dim: int, r0: int, length: int) -> torch.Tensor:
        assert dim == 0, "rows only"
        r1 = r0 + length
        n_in, bs = self.shape[1], self.part.blocksize
        align = bs // math.gcd(n_in, bs)  # rows that start on a block boundary: dequantize_rows starts there
        start = r0 // align * align
        n = (r1 - start) * n_in
        out = torch.empty(n + 1, dtype=torch.float32, device=self.device)
        self.part.dequantize_rows(start, r1, out, torch.empty(-(-n // 2), dtype=torch.int64, device=self.device))
        return out[(r0 - start) * n_in:n].view(r1 - r0, n_in).to(self.dtype)


class Scratch:
    """Where the projections of one model are dequantized (one step at a time). backend "torch" (auto on
    the CPU): an fp32 tile and its int64 index, sized for a cache. "triton" (auto on CUDA): one buffer in
    the compute dtype, sized by reserve for the largest tile (a whole fused weight, up to
    TRITON_TILE_ELEMENTS); its nbytes is what this costs the device beside the packed weights."""

    def __init__(self, device, backend: str = "auto"):
        self.device = torch.device(device)
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ("torch", "triton"):
            raise ValueError(f"4-bit backend must be auto, torch or triton; got {backend!r}")
        self.triton = backend == "triton"
        self.reserve(0)

    def reserve(self, elements: int, dtype: torch.dtype = torch.float32) -> None:
        """Room for a tile of `elements` weights (dtype: the compute dtype, which the torch path casts to
        lazily)."""
        self.cast: torch.Tensor | None = None  # torch path: the tile in a half-precision compute dtype
        if self.triton:
            self.weights, self.index = torch.empty(elements, dtype=dtype, device=self.device), None
            return
        self.weights = torch.empty(elements + 1, dtype=torch.float32, device=self.device)  # + 1: odd sizes
        self.index = torch.empty(-(-elements // 2), dtype=torch.int64, device=self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weights, self.index, self.cast) if t is not None)

    def buffer(self, elements: int, dtype: torch.dtype) -> torch.Tensor:
        """Triton path: the scratch's first `elements` in `dtype` (regrown only if reserve was not told)."""
        if self.weights.dtype != dtype or self.weights.numel() < elements:
            self.weights = torch.empty(max(elements, self.weights.numel()), dtype=dtype, device=self.device)
        return self.weights[:elements]


class Weight4bit:
    """A fused weight (q/k/v, gate/up, or one projection): its parts stacked along the output."""

    def __init__(self, parts: list[Packed4bit], scratch: Scratch, tile_elements: int | None = None):
        n_in = parts[0].shape[1]
        if tile_elements is None:
            tile_elements = TRITON_TILE_ELEMENTS if scratch.triton else TILE_ELEMENTS
        self.parts, self.scratch = parts, scratch
        self.shape = (sum(p.shape[0] for p in parts), n_in)
        self.offsets = [0]
        for p in parts:
            self.offsets.append(self.offsets[-1] + p.shape[0])
        align = max(p.blocksize // math.gcd(n_in, p.blocksize) for p in parts)
        rows = max(align, tile_elements // n_in // align * align)
        if rows < self.shape[0] and any(p.shape[0] % align for p in parts):
            rows = self.shape[0]  # odd shapes: tiles could split a block, so take the whole weight at once
        self.tile_rows = min(rows, self.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def scratch_elements(self) -> int:
        return self.tile_rows * self.shape[1]

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0..r1 of the fused W, dequantized into the scratch (valid until the next call)."""
        n_in, s = self.shape[1], self.scratch
        w = s.buffer((r1 - r0) * n_in, dtype) if s.triton else s.weights[:(r1 - r0) * n_in]
        for part, start, end in zip(self.parts, self.offsets, self.offsets[1:]):
            lo, hi = max(r0, start), min(r1, end)
            if lo < hi and s.triton:  # straight into the compute dtype
                part.dequantize_into(lo - start, hi - start, w[(lo - r0) * n_in:(hi - r0) * n_in])
            elif lo < hi:
                part.dequantize_rows(lo - start, hi - start, s.weights[(lo - r0) * n_in:], s.index)
        w = w.view(r1 - r0, n_in)
        if dtype != w.dtype:  # the torch path's fp32 tile
            if s.cast is None or s.cast.dtype != dtype or s.cast.numel() < w.numel():
                s.cast = torch.empty(s.weights.numel(), dtype=dtype, device=w.device)
            w = s.cast[:w.numel()].view_as(w).copy_(w)
        return w

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] @ W.T + bias -> [T, out], W dequantized tile by tile (bitsandbytes' fp32 path:
        dequantize to the compute dtype, then one matmul; on the Triton path one tile is the whole W)."""
        n_out = self.shape[0]
        if self.tile_rows >= n_out:
            return F.linear(x, self.rows(0, n_out, x.dtype), bias)
        y = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
        for r0 in range(0, n_out, self.tile_rows):
            r1 = min(r0 + self.tile_rows, n_out)
            y[:, r0:r1] = F.linear(x, self.rows(r0, r1, x.dtype), None if bias is None else bias[r0:r1])
        return y

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` [T] of a one-part W, dequantized -> [T, in]: an embedding table kept 4-bit
        (in must be a multiple of blocksize, so that every row is whole blocks)."""
        (p,) = self.parts
        n_in, bs = p.shape[1], p.blocksize
        codes = p.data.view(p.shape[0], n_in // 2).index_select(0, ids).reshape(-1)
        w = torch.index_select(p.pairs, 0, codes.long()).view(torch.float32).view(-1, bs)
        w = w * p.absmax.view(p.shape[0], n_in // bs).index_select(0, ids).view(-1, 1)
        return w.view(ids.shape[0], n_in).to(dtype)


def expand_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                  nested_blocksize: int, offset: float) -> torch.Tensor:
    """Double quantization undone: absmax[j] = nested_code[codes[j]] * nested_absmax[j // 256] + offset."""
    v = nested_code[codes.reshape(-1).long()]
    n = v.numel()
    blocks = -(-n // nested_blocksize)
    v = F.pad(v, (0, blocks * nested_blocksize - n))
    return (v.view(blocks, nested_blocksize) * nested_absmax.view(blocks, 1)).reshape(-1)[:n] + offset


def _positive(state: dict, field: str, key: str) -> int:
    value = state.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: quant_state {field} {value!r} is not a positive integer")
    return value


def read_packed(tensors, key: str) -> Packed4bit | None:
    """The 4-bit weight saved under `key` (e.g. model.layers.0.self_attn.q_proj.weight) by transformers'
    bitsandbytes integration, or None when `key` is a plain tensor. tensors: server.model.checkpoint.Checkpoint."""
    for quant_type in QUANT_TYPES:
        blob = tensors.pop(f"{key}.quant_state.bitsandbytes__{quant_type}", None)
        if blob is not None:
            break
    else:
        return None
    state = json.loads(bytes(blob.tolist()).decode())
    if state.get("quant_type") != quant_type:
        raise ValueError(f"{key}: quant_state says {state.get('quant_type')!r}, its key says {quant_type!r}")
    shape = tuple(state["shape"])
    if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{key}: a 4-bit weight of shape {shape} is not a linear layer's")
    data, absmax, code = tensors.pop(key), tensors.pop(f"{key}.absmax"), tensors.pop(f"{key}.quant_map")
    bs = _positive(state, "blocksize", key)
    if code.numel() != 16:
        raise ValueError(f"{key}: a code table of {code.numel()} entries (quant_map), 4-bit codes need 16")
    double = "nested_blocksize" in state
    if double:
        nested_bs, nested_absmax = _positive(state, "nested_blocksize", key), tensors.pop(f"{key}.nested_absmax")
        nested_code = tensors.pop(f"{key}.nested_quant_map")
        if nested_code.numel() != 256:
            raise ValueError(f"{key}: a nested code table of {nested_code.numel()} entries (nested_quant_map), "
                             "8-bit codes need 256")
        if absmax.dtype != torch.uint8 or nested_absmax.numel() != -(-absmax.numel() // nested_bs):
            raise ValueError(f"{key}: nested_absmax {tuple(nested_absmax.shape)} does not fit absmax codes "
                             f"{tuple(absmax.shape)} {absmax.dtype} in blocks of {nested_bs}")
        absmax = expand_absmax(absmax, nested_absmax.float(), nested_code.float(), nested_bs,
                               float(state["nested_offset"]))
    numel = shape[0] * shape[1]
    if data.dtype != torch.uint8 or data.numel() != -(-numel // 2) or absmax.numel() != -(-numel // bs):
        raise ValueError(f"{key}: packed data {tuple(data.shape)} {data.dtype} or absmax {tuple(absmax.shape)} "
                         f"does not fit a {shape} weight in blocks of {bs} (only quant_storage uint8 is read)")
    return Packed4bit(data.reshape(-1).contiguous(), absmax.float().contiguous(), code.float().contiguous(), bs,
                      shape, quant_type, double)


def quantize(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
             blocksize: int = 64) -> Packed4bit:
    """bitsandbytes' own quantizer on the CPU (what transformers' load_in_4bit runs): the same codes a
    QLoRA training run on this base saw. bitsandbytes is needed for this only."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise RuntimeError("--quantization needs bitsandbytes (pip install 'quiver[quantize]'); serving an "
                           "already quantized checkpoint does not") from exc
    data, state = bnbf.quantize_4bit(weight.contiguous().cpu(), blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type)
    absmax = state.absmax
    if state.nested:
        absmax = expand_absmax(absmax, state.state2.absmax.float(), state.state2.code.float(),
                               state.state2.blocksize, float(state.offset))
    return Packed4bit(data.reshape(-1).contiguous(), absmax.float().contiguous(), state.code.float().contiguous(),
                      blocksize, tuple(weight.shape), quant_type, double_quant)


def read_dequantized(tensors) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as fp32, 4-bit weights dequantized (what merging works on, as PEFT's
    merge_and_unload on a bitsandbytes model does). tensors: server.model.checkpoint.Checkpoint."""
    out = {}
    for key in [k.split(".quant_state.")[0] for k in tensors if ".quant_state.bitsandbytes__" in k]:
        out[key] = read_packed(tensors, key).dequantize()
    out.update({key: tensors.pop(key).float() for key in tensors})
    return out
