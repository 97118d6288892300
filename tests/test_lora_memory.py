"""What loading LoRA adapters costs in memory beyond the adapters themselves: DoRA's norms read the base a
block of rows at a time (never a full fp32 [out, in] beside the KV cache), and staged adapters pin host
memory only within a budget, and the host tier is bounded by default on a GPU."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quiver.adapters.lora import LoraAdapter, LoraModule, dora_factor
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
    align = 64 // math.gcd(in_f, 64)  # a block may start up to align - 1 rows earlier
    assert probe.largest <= (5 + align - 1) * in_f + 1 < out_f * in_f


def lora_adapter(name: str, out_f: int = 6, in_f: int = 5, r: int = 2) -> LoraAdapter:
    module = LoraModule(torch.randn(r, in_f), torch.randn(out_f, r))
    return LoraAdapter(name, spec=None, modules={(0, "q_proj"): module})


def family_on(device: str, max_loras: int, monkeypatch) -> tuple:
    """A LoRA family whose model sits on `device` (only its device and dtype are read when staging), and the
    tensors its pin function was given (torch's pin_memory needs a GPU: recorded instead)."""
    from types import SimpleNamespace

    from quiver.server.families import lora
    pinned = []

    def fake_pin(t):
        pinned.append(t)
        return t

    monkeypatch.setattr(lora, "pin", fake_pin)
    model = SimpleNamespace(cfg=None, device=torch.device(device), dtype=torch.float32)
    return lora.LoraFamily(model, ops=None, max_loras=max_loras, max_rank=4, files={}), pinned


def is_pinned(staged, pinned) -> bool:
    tensors = [t for ts in staged.tensors.values() for t in ts if t is not None]
    return all(any(t is p for p in pinned) for t in tensors)


def test_staged_adapters_beyond_the_pin_budget_are_pageable_and_a_freed_one_gives_its_pin_back(monkeypatch):
    import gc

    family, pinned = family_on("cuda", 2, monkeypatch)  # the budget: 2 x --max-loras = 4
    staged = [family.stage(lora_adapter(f"a{i}")) for i in range(6)]
    assert [is_pinned(s, pinned) for s in staged] == [True] * 4 + [False] * 2
    assert len(pinned) == 4 * 2  # A and B^T of each pinned adapter, nothing of the others
    del staged[1]  # left the host tier: its staged copy is freed
    gc.collect()
    staged.append(family.stage(lora_adapter("again")))
    assert is_pinned(staged[-1], pinned)
    assert not is_pinned(family.stage(lora_adapter("over")), pinned)  # 4 live pinned copies again


def test_nothing_is_pinned_when_the_slots_are_on_the_cpu(monkeypatch):
    family, pinned = family_on("cpu", 2, monkeypatch)
    for i in range(3):
        family.stage(lora_adapter(f"a{i}"))
    assert pinned == []


def test_the_host_tier_is_bounded_by_default_on_a_gpu():
    from quiver.server.engine.config import EngineConfig
    assert EngineConfig(device="cuda", max_loras=4).max_cpu_loras == 8
    assert EngineConfig(device="cuda:1").max_cpu_loras == 2 * EngineConfig().max_loras
    assert EngineConfig(device="cuda", max_loras=0).max_cpu_loras == 1
    assert EngineConfig(device="cuda", max_loras=4, max_cpu_loras=100).max_cpu_loras == 100
    assert EngineConfig(device="cpu").max_cpu_loras is None  # the CPU's host tier is its serving memory
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig(device="cuda", max_loras=4, max_cpu_loras=3)
