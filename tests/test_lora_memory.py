"""What loading LoRA adapters costs in memory beyond the adapters themselves: DoRA's norms read the base a
block of rows at a time (never a full fp32 [out, in] beside the KV cache), and staged adapters pin host
memory only within a budget."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quiver.adapters.lora import dora_factor
from quiver.server.model.fourbit import Packed4bit, Rows4bit


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output holds (every temporary an op creates is an output)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def naive(w: torch.Tensor, a, b, m) -> torch.Tensor:
    return m / torch.linalg.norm(w.float() + b @ a, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_norm_in_row_blocks_equals_the_whole_and_bounds_its_temporaries(dtype):
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 50, 24, 4
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    a, b, m = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), torch.rand(out_f, generator=g)
    before = w.clone()
    probe = LargestTensor()
    with probe:
        got = dora_factor(w, a, b, m, chunk_elements=7 * in_f)  # blocks of 7 rows: 50 is not a multiple
    torch.testing.assert_close(got, naive(w, a, b, m), rtol=1e-6, atol=0)
    assert probe.largest <= 7 * in_f  # the whole W + sBA would be 50 x 24
    assert torch.equal(w, before)  # W's rows are added into the block, never the reverse
    torch.testing.assert_close(dora_factor(w, a, b, m), naive(w, a, b, m), rtol=1e-6, atol=0)  # one block


def packed4bit(out_f: int, in_f: int, blocksize: int = 64, seed: int = 0) -> Packed4bit:
    g = torch.Generator().manual_seed(seed)
    n = out_f * in_f
    data = torch.randint(0, 256, (-(-n // 2),), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-n // blocksize), generator=g) + 0.5
    code = torch.linspace(-1, 1, 16)
    return Packed4bit(data, absmax, code, blocksize, (out_f, in_f), "nf4", False)


@pytest.mark.parametrize("in_f", [96, 40])  # 40: rows start inside 64-element blocks
def test_4bit_base_is_read_a_block_of_rows_at_a_time(in_f):
    part, out_f = packed4bit(37, in_f), 37
    whole = part.dequantize()
    rows = Rows4bit(part, torch.bfloat16)
    assert rows.shape == (out_f, in_f)
    for r0, r1 in ((0, 37), (3, 11), (8, 9), (33, 37)):
        assert torch.equal(rows.narrow(0, r0, r1 - r0), whole.to(torch.bfloat16)[r0:r1]), (r0, r1)
    g = torch.Generator().manual_seed(1)
    a, b, m = torch.randn(4, in_f, generator=g), torch.randn(out_f, 4, generator=g), torch.rand(out_f, generator=g)
    probe = LargestTensor()
    with probe:
        got = dora_factor(rows, a, b, m, chunk_elements=5 * in_f)
    torch.testing.assert_close(got, naive(whole.to(torch.bfloat16), a, b, m), rtol=1e-6, atol=0)
    align = 64 // __import__("math").gcd(in_f, 64)  # a block may start up to align - 1 rows earlier
    assert probe.largest <= (5 + align - 1) * in_f + 1 < out_f * in_f
