"""Batched-LoRA kernels against the per-token reference: the CPU path and the Triton kernels
(interpreter on CPU, the real thing on a GPU)."""
from __future__ import annotations

import pytest
import torch

from quiver.kernels.torch_ops import block_diagonal, lora_apply, lora_expand_ref, lora_shrink_ref
from quiver.kernels.torch_meta import torch_adapter_meta
from quiver.kernels.triton_meta import triton_lora_meta

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
    ranks = ([1, 5, 16, 7, 16] if rank == 16 else [1, max(1, rank // 2), rank, max(1, rank // 3), rank])[:n_slots]
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
        meta = torch_adapter_meta(slots, padded=padded)
        if meta is None:
            assert (slots < 0).all()
            return
        y = torch.zeros(n_tokens, offsets[-1])
        lora_apply(x, y, a, block_diagonal(b, offsets), meta, offsets)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)


def _nan_fill_unused(a, b, slots):
    """Slots no token uses become NaN: a kernel reading the wrong slot shows at once."""
    used = set(slots.tolist())
    for s in range(a.shape[0]):
        if s not in used:
            a[s] = float("nan")
            b[s] = float("nan")


def _on_device(meta):
    """The meta's tensors where the kernels run, as the engine's step upload puts them."""
    from quiver.server.engine.upload import StepUpload

    StepUpload(DEVICE).send(meta)
    return meta


def _run_triton(form, x, a, b, offsets, slots, y):
    from quiver.kernels import lora_triton as lt

    meta = triton_lora_meta(slots)
    if meta is None:
        return None
    meta = _on_device(meta)
    if form == "sgmv":
        xa = lt.lora_shrink_sgmv(x, a, meta)
        lt.lora_expand_sgmv(xa, b, offsets, meta, y)
    else:
        xa = lt.lora_shrink_bgmv(x, a, meta)
        lt.lora_expand_bgmv(xa, b, offsets, meta, y)
    return xa


@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("n_tokens,popularity", CASES)
def test_triton_kernels_match_reference(form, n_tokens, popularity):
    x, a, b, offsets, slots = make_case(n_tokens, popularity, seed=n_tokens)
    want = per_token(x, a, b, offsets, slots)
    _nan_fill_unused(a, b, slots)
    x, a, b = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    y0 = torch.randn(n_tokens, offsets[-1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = y0.clone()
    xa = _run_triton(form, x, a, b, offsets, slots, y)
    if xa is None:
        assert (slots < 0).all()
        return
    lora_rows = (slots >= 0).to(DEVICE)  # base tokens' rows of xa are never read (nor written)
    want_xa = lora_shrink_ref(x.cpu(), a.cpu().nan_to_num(), slots)
    torch.testing.assert_close(xa[lora_rows].cpu(), want_xa[lora_rows.cpu()], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((y - y0).double().cpu(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[~lora_rows], y0[~lora_rows])  # base tokens untouched


# tolerance of each dtype against float64 maths on the same (rounded) inputs, relative to the output's size
HALF_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 16, 128])
def test_triton_kernels_in_every_dtype_and_rank(form, dtype, rank):
    """bf16 and fp16 (on a GPU their tensor-core dots; in the interpreter widened, as bf16 must be
    there), and ranks from 1 to 128, walked in BLOCK_R steps."""
    x, a, b, offsets, slots = make_case(20, "with_base", rank=rank, n_slots=3, seed=rank, dtype=dtype)
    want = per_token(x.double(), a.double(), b.double(), offsets, slots)
    y = torch.zeros(20, offsets[-1], dtype=dtype, device=DEVICE)
    _run_triton(form, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), offsets, slots, y)
    scale = want.abs().max().item()
    torch.testing.assert_close(y.double().cpu(), want, atol=HALF_TOL[dtype] * scale, rtol=HALF_TOL[dtype])


def test_triton_dispatch_uses_both_forms():
    from quiver.kernels import lora_triton as lt

    calls = []
    for n_tokens, popularity in ((40, "single"), (6, "uniform")):
        x, a, b, offsets, slots = make_case(n_tokens, popularity)
        meta = _on_device(triton_lora_meta(slots))
        calls.append(meta.max_len >= lt.BLOCK_M)
        y = torch.zeros(n_tokens, offsets[-1], device=DEVICE)
        lt.lora_apply(x.to(DEVICE), y, a.to(DEVICE), b.to(DEVICE), offsets, meta)
        torch.testing.assert_close(y.double().cpu(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)
    assert calls == [True, False]


def test_launch_grids_follow_the_tokens():
    """A mixed step (one 2048-token prefill segment, 31 one-token decode segments) launches SGMV and
    attention programs in proportion to its tokens, not segments x the longest segment."""
    from quiver.kernels.grouping import ROW_TILE, attention_tiles, row_tiles

    seg_lens = torch.tensor([2048] + [1] * 31)
    tiles = row_tiles(seg_lens)
    assert tiles.shape[0] == 2048 // ROW_TILE + 31  # was 32 segments x 128 row blocks = 4096
    assert {tuple(t) for t in tiles.tolist()} == {(s, m) for s, n in enumerate(seg_lens.tolist())
                                                  for m in range(-(-n // ROW_TILE))}
    group = 4  # query heads per KV head
    assert attention_tiles(seg_lens, group).shape[0] == 2048 * group // ROW_TILE + 31
    for lens in ([2048] + [1] * 31, [5, 9, 300], [1] * 64):
        lens_t = torch.tensor(lens)
        assert row_tiles(lens_t).shape[0] <= sum(lens) / ROW_TILE + len(lens)


def test_cpu_path_without_gather_when_rows_are_grouped():
    """Rows sorted by adapter with equal counts (the usual decode step): the padded layout is a view."""
    x, a, b, offsets, _ = make_case(32, "uniform")
    slots = torch.cat([torch.full((4,), -1), torch.arange(28) // 7])  # base rows first, then 4 adapters x 7
    meta = torch_adapter_meta(slots)
    assert meta.padded and meta.contiguous_from == 4
    y = torch.zeros(32, offsets[-1])
    lora_apply(x, y, a, block_diagonal(b, offsets), meta, offsets)
    torch.testing.assert_close(y.double(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)


def test_cpu_path_on_slices_when_long_segments_are_in_order():
    """A prefill-like step: rows grouped by adapter, of unequal lengths. Each segment is a slice of x and
    y (no padding, no gather), and the result is the definition."""
    x, a, b, offsets, _ = make_case(146, "uniform")
    slots = torch.cat([torch.full((3,), -1), torch.full((40,), 0), torch.full((70,), 2), torch.full((33,), 3)])
    meta = torch_adapter_meta(slots)
    assert not meta.padded and meta.segments_from == 3
    y = torch.zeros(146, offsets[-1])
    lora_apply(x, y, a, block_diagonal(b, offsets), meta, offsets)
    torch.testing.assert_close(y.double(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)
    shuffled = torch_adapter_meta(slots[torch.randperm(146, generator=torch.Generator().manual_seed(0))])
    assert shuffled.segments_from is None  # out of order: the gathering forms


def test_cpu_path_expands_wide_slices_one_by_one():
    """Gate/up-like slices (each at least WIDE_SLICES wide) take their own block of b, not the whole
    block-diagonal: the same result, in the grouped decode layout."""
    from quiver.kernels.torch_ops import WIDE_SLICES

    offsets = (0, WIDE_SLICES, 2 * WIDE_SLICES + 8)
    x, a, b, offsets, _ = make_case(24, "uniform", offsets=offsets)
    slots = torch.arange(24) // 6  # 4 adapters x 6 rows, grouped
    meta = torch_adapter_meta(slots)
    assert meta.padded and meta.contiguous_from == 0
    y = torch.zeros(24, offsets[-1])
    lora_apply(x, y, a, block_diagonal(b, offsets), meta, offsets)
    torch.testing.assert_close(y.double(), per_token(x, a, b, offsets, slots), atol=1e-4, rtol=1e-5)
