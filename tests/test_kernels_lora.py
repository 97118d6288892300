"""Batched-LoRA kernels against the per-token reference: the CPU path and the Triton kernels
(interpreter on CPU, the real thing on a GPU)."""
from __future__ import annotations

import pytest
import torch

from quiver.kernels.torch_ops import block_diagonal, lora_apply, lora_expand_ref, lora_shrink_ref
from quiver.kernels.meta import build_lora_meta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def per_token(x, a, b, offsets, slots):
    """The definition, one token at a time."""
    rank = b.shape[1]
    y = torch.zeros(x.shape[0], offsets[-1], dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        xa = a[slot].double() @ x[t].double()
        for s in range(len(offsets) - 1):
            y[t, offsets[s]:offsets[s + 1]] = xa[s * rank:(s + 1) * rank] @ b[slot, :, offsets[s]:offsets[s + 1]].double()
    return y


POPULARITY = {
    "uniform": lambda n, L, g: torch.arange(n) % L,
    "skewed": lambda n, L, g: torch.where(torch.rand(n, generator=g) < 0.8, 0, torch.randint(0, L, (n,), generator=g)),
    "with_base": lambda n, L, g: torch.randint(-1, L, (n,), generator=g),
    "single": lambda n, L, g: torch.full((n,), L - 1),
}


def make_case(n_tokens, popularity, offsets=(0, 40, 56, 72), k=72, rank=16, n_slots=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n_slices = len(offsets) - 1
    slots = POPULARITY[popularity](n_tokens, n_slots - 1, g)  # the last slot is never used
    a = torch.randn(n_slots, n_slices * rank, k, generator=g)
    b = torch.randn(n_slots, rank, offsets[-1], generator=g)
    ranks = [1, 5, 16, 7, 16][:n_slots]
    for s, r in enumerate(ranks):  # mixed ranks: zero padding beyond each slot's rank
        for i in range(n_slices):
            a[s, i * rank + r:(i + 1) * rank] = 0
        b[s, r:] = 0
    x = torch.randn(n_tokens, k, generator=g)
    return x.to(dtype), a.to(dtype), b.to(dtype), offsets, slots


CASES = [(n, p) for n in (1, 7, 33) for p in POPULARITY]


@pytest.mark.parametrize("n_tokens,popularity", CASES)
def test_reference_and_cpu_path_match_definition(n_tokens, popularity):
    x, a, b, offsets, slots = make_case(n_tokens, popularity)
    want = per_token(x, a, b, offsets, slots)
    ref = lora_expand_ref(lora_shrink_ref(x, a, slots), b, offsets, slots, torch.zeros(n_tokens, offsets[-1]))
    torch.testing.assert_close(ref.double(), want, atol=1e-4, rtol=1e-5)
    for padded in (True, False):  # both CPU forms, whichever the heuristic would pick
        meta = build_lora_meta(slots, set(), a.shape[0], "cpu", padded=padded)
        if meta is None:
            assert (slots < 0).all()
            return
        y = torch.zeros(n_tokens, offsets[-1])
        lora_apply(x, y, a, block_diagonal(b, offsets), meta)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)


def _nan_fill_unused(a, b, slots):
    """Slots no token uses become NaN: a kernel reading the wrong slot shows at once."""
    used = set(slots.tolist())
    for s in range(a.shape[0]):
        if s not in used:
            a[s] = float("nan")
            b[s] = float("nan")


@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("n_tokens,popularity", CASES)
def test_triton_kernels_match_reference(form, n_tokens, popularity):
    from quiver.kernels import lora_triton as lt

    x, a, b, offsets, slots = make_case(n_tokens, popularity, seed=n_tokens)
    want = per_token(x, a, b, offsets, slots)
    _nan_fill_unused(a, b, slots)
    meta = build_lora_meta(slots, set(), a.shape[0], DEVICE)
    if meta is None:
        return
    x, a, b = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    y0 = torch.randn(n_tokens, offsets[-1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = y0.clone()
    if form == "sgmv":
        xa = lt.lora_shrink_sgmv(x, a, meta)
        lt.lora_expand_sgmv(xa, b, offsets, meta, y)
    else:
        xa = lt.lora_shrink_bgmv(x, a, meta.token_slots)
        lt.lora_expand_bgmv(xa, b, offsets, meta.token_slots, y)
    torch.testing.assert_close(xa[slots.to(DEVICE) < 0], torch.zeros_like(xa[slots.to(DEVICE) < 0]))
    torch.testing.assert_close((y - y0).double().cpu(), want, atol=1e-4, rtol=1e-5)


def test_triton_dispatch_uses_both_forms():
    from quiver.kernels import lora_triton as lt

    calls = []
    for n_tokens, popularity in ((40, "single"), (6, "uniform")):
        x, a, b, offsets, slots = make_case(n_tokens, popularity)
        meta = build_lora_meta(slots, set(), a.shape[0], DEVICE)
        calls.append(meta.max_len >= lt.BLOCK_M)
        y = torch.zeros(n_tokens, offsets[-1], device=DEVICE)
        lt.lora_apply(x.to(DEVICE), y, a.to(DEVICE), b.to(DEVICE), offsets, meta)
        torch.testing.assert_close(y.double().cpu(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)
    assert calls == [True, False]


def test_cpu_path_without_gather_when_rows_are_grouped():
    """Rows sorted by adapter with equal counts (the usual decode step): the padded layout is a view."""
    x, a, b, offsets, _ = make_case(32, "uniform")
    slots = torch.cat([torch.full((4,), -1), torch.arange(28) // 7])  # base rows first, then 4 adapters x 7
    meta = build_lora_meta(slots, set(), a.shape[0], "cpu")
    assert meta.padded and meta.contiguous_from == 4
    y = torch.zeros(32, offsets[-1])
    lora_apply(x, y, a, block_diagonal(b, offsets), meta)
    torch.testing.assert_close(y.double(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)
