"""The Triton 4-bit dequantization (kernels.nf4_triton), CUDA's path for a 4-bit base: against
bitsandbytes' own dequantization, and Weight4bit on that path against its torch path. On a machine with
no GPU the kernel runs in Triton's interpreter, whose fp32 -> bf16 cast truncates (a GPU rounds to
nearest even): bf16 is checked against the matching rounding of the exact fp32 result."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from quiver.kernels.nf4_triton import BYTES, dequantize_4bit
from quiver.server.model.fourbit import Packed4bit, Scratch, Weight4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def as_bf16(w: torch.Tensor) -> torch.Tensor:
    """What the kernel's cast makes of fp32 w: rounded to nearest even, or truncated in the interpreter."""
    if not INTERPRETED:
        return w.bfloat16()
    return (w.contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_kernel_equals_bitsandbytes_dequantize(quant_type, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    # odd shapes: out·in not a multiple of the block size (bitsandbytes' generic kernel); 60x77 spans 3 programs
    for shape in [(60, 77), (7, 9), (33, 1), (64, 128)]:
        w = torch.randn(shape) * 0.3
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        want = bnbf.dequantize_4bit(data, state).reshape(-1)
        absmax = state.absmax
        if state.nested:  # bitsandbytes' own expansion of its 8-bit absmax
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        n = want.numel()
        assert n > 2 * BYTES or n % 64 or shape == (64, 128)
        for dtype, expect in ((torch.float32, want), (torch.bfloat16, as_bf16(want)), (torch.float16, want.half())):
            out = torch.full((n + 5,), float("nan"), dtype=dtype)  # NaN past the end: nothing written there
            dequantize_4bit(data.reshape(-1), absmax.float(), state.code.float(), 64, out[:n])
            assert torch.equal(out[:n], expect), (shape, dtype)
            assert out[n:].isnan().all()


def random_part(rows: int, cols: int, seed: int) -> Packed4bit:
    """A 4-bit projection with random codes and scales (no bitsandbytes needed: runs on the GPU machine)."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    data = torch.randint(0, 256, (-(-n // 2),), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n // 64), generator=g) + 0.1
    code = torch.linspace(-1, 1, 16)
    return Packed4bit(data, absmax, code, 64, (rows, cols), "nf4", False).to(DEVICE)


@pytest.mark.parametrize("tile", [None, 8 * 128])  # the whole fused weight, or 8-row tiles spanning parts
def test_weight4bit_triton_path_equals_torch_path(tile):
    parts = [random_part(rows, 128, seed) for seed, rows in enumerate((48, 16, 80))]
    x, bias = torch.randn(5, 128, device=DEVICE), torch.randn(144, device=DEVICE)
    torch_scratch, triton_scratch = Scratch(DEVICE, backend="torch"), Scratch(DEVICE, backend="triton")
    plain = Weight4bit(parts, torch_scratch)
    fused = Weight4bit(parts, triton_scratch, tile_elements=tile)
    torch_scratch.reserve(plain.scratch_elements)
    triton_scratch.reserve(fused.scratch_elements, torch.float32)
    assert fused.scratch_elements == (144 * 128 if tile is None else tile)  # the whole weight in one tile
    assert triton_scratch.nbytes == fused.scratch_elements * 4
    whole = plain.rows(0, 144, torch.float32).clone()
    assert torch.equal(fused.rows(44, 52, torch.float32), whole[44:52])  # starts inside a part, spans two
    if tile is None:
        assert torch.equal(fused.rows(0, 144, torch.float32), whole)
        assert torch.equal(fused.rows(0, 144, torch.bfloat16), as_bf16(whole))
    assert torch.allclose(fused.linear(x, bias), F.linear(x, whole, bias), atol=1e-5, rtol=0)


def test_triton_scratch_holds_the_largest_weight_in_the_compute_dtype():
    scratch = Scratch(DEVICE, backend="triton")
    weights = [Weight4bit([random_part(rows, 128, rows)], scratch) for rows in (16, 80)]
    scratch.reserve(max(w.scratch_elements for w in weights), torch.bfloat16)
    assert scratch.nbytes == 80 * 128 * 2
    assert not Scratch("cpu").triton  # auto: the torch path on the CPU, Triton on CUDA
    assert Scratch(DEVICE).triton == (DEVICE == "cuda")
