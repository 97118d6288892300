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


def _run_triton(form, x, a, b, offsets, slots, y, split=None):
    """y += the delta through one form's shrink and expand; returns xa with its rows as the tokens' rows
    (NaN for tokens with no adapter), None when no token has one."""
    from quiver.kernels import lora_triton as lt

    meta = triton_lora_meta(slots)
    if meta is None:
        return None
    meta = _on_device(meta)
    shrink, expand = ((lt.lora_shrink_sgmv, lt.lora_expand_sgmv) if form == "sgmv"
                      else (lt.lora_shrink_bgmv, lt.lora_expand_bgmv))
    xa = shrink(x, a, meta, split=split)
    assert xa.shape == (meta.seg_index.numel(), a.shape[1]) and xa.dtype == x.dtype  # adapter tokens only
    expand(xa, b, offsets, meta, y)
    by_token = torch.full((len(slots), a.shape[1]), float("nan"), dtype=torch.float64)
    by_token[meta.seg_index.cpu()] = xa.double().cpu()
    return by_token


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
    lora_rows = (slots >= 0).to(DEVICE)
    want_xa = lora_shrink_ref(x.cpu().double(), a.cpu().nan_to_num().double(), slots)
    torch.testing.assert_close(xa[lora_rows.cpu()], want_xa[lora_rows.cpu()], atol=1e-4, rtol=1e-5)
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


@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rank,dtype", [(1, torch.float32), (16, torch.float32), (64, torch.float32),
                                        (16, torch.bfloat16)])
def test_split_k_shrink_matches_reference(form, split, rank, dtype):
    """K split into chunks (K = 200 is no multiple of a chunk: 3 chunks of 96, 96 and 8), each chunk's fp32
    partial summed: the reference's shrink, and the whole delta, at ranks 1 to 64 (3 column blocks at 64)."""
    from quiver.kernels import lora_triton as lt

    k = 200
    assert lt.split_k(1, k, split) == ((3, 96) if split == 3 else (1, 224))
    x, a, b, offsets, slots = make_case(20, "with_base", k=k, rank=rank, n_slots=3, seed=rank, dtype=dtype)
    want = per_token(x.double(), a.double(), b.double(), offsets, slots)
    want_xa = lora_shrink_ref(x.double(), a.double(), slots)
    _nan_fill_unused(a, b, slots)
    y = torch.zeros(20, offsets[-1], dtype=dtype, device=DEVICE)
    xa = _run_triton(form, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), offsets, slots, y, split)
    rows = slots >= 0
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(xa[rows], want_xa[rows], atol=tol * want_xa.abs().max().item(), rtol=tol)
    torch.testing.assert_close(y.double().cpu(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_split_k_is_chosen_by_shape():
    """Decode-like launches (few programs, long K) split K; prefill-like ones (a row tile per 16 tokens)
    and short K do not. Every chunk is whole BLOCK_K steps, the chunks cover K, none is empty."""
    from quiver.kernels import lora_triton as lt

    k = 4096  # Llama-8B's hidden size
    for programs in (1, 8, 32, 100):  # decode: tokens x 1 column block (rank 16)
        chunks, chunk = lt.split_k(programs, k)
        assert chunks > 1 and chunk % lt.BLOCK_K == 0 and chunk >= lt.MIN_TRIPS * lt.BLOCK_K
        assert (chunks - 1) * chunk < k <= chunks * chunk
    assert lt.split_k(32, k)[0] * 32 >= lt.SMS  # batch 32 fills the SMs
    assert lt.split_k(4096 // lt.BLOCK_M, k) == (1, k)  # a 4096-token prefill: 256 row tiles
    assert lt.split_k(lt.SMS, k)[0] == 1
    assert lt.split_k(4, 72)[0] == 1  # too short to split


def test_decode_shrink_splits_and_is_reproducible():
    """A decode-like step (2 tokens, K = 1024) takes the split path by itself; the sum of its partials is
    the reference's, and the same bits on a rerun."""
    from quiver.kernels import lora_triton as lt

    k = 1024
    assert lt.split_k(2, k)[0] > 1
    x, a, b, offsets, slots = make_case(2, "uniform", k=k, n_slots=3)
    want_xa = lora_shrink_ref(x.double(), a.double(), slots)
    _nan_fill_unused(a, b, slots)
    meta = _on_device(triton_lora_meta(slots))
    x, a = x.to(DEVICE), a.to(DEVICE)
    xa = lt.lora_shrink_bgmv(x, a, meta)
    torch.testing.assert_close(xa.double().cpu(), want_xa[meta.seg_index.cpu()], atol=1e-4, rtol=1e-5)
    assert torch.equal(lt.lora_shrink_bgmv(x, a, meta), xa)


def test_only_unspecialized_arguments_change_between_steps(monkeypatch):
    """Triton compiles a kernel again when an int argument it specializes on (== 1, divisible by 16)
    changes: every int argument that differs between steps of different sizes (decode and prefill, split
    and not) must be one of PER_STEP. The launches are recorded, not run."""
    from quiver.kernels import lora_triton as lt

    launched: dict[str, list[dict]] = {}

    class Record:
        def __init__(self, name):
            self.name, self.arg_names = name, getattr(lt, name).arg_names

        def __getitem__(self, grid):
            return lambda *args, **consts: launched.setdefault(self.name, []).append(
                {n: v for n, v in zip(self.arg_names, args) if isinstance(v, int)})

    for name in ("_shrink_sgmv", "_expand_sgmv", "_shrink_bgmv", "_expand_bgmv"):
        monkeypatch.setattr(lt, name, Record(name))
    k, offsets = 1024, (0, 40, 56, 72)
    a, b = torch.zeros(10, 48, k, device=DEVICE), torch.zeros(10, 16, 72, device=DEVICE)
    for slots in (torch.arange(2) % 2, torch.arange(5) % 3, torch.arange(140) % 10,  # BGMV, split and not
                  torch.zeros(40, dtype=torch.long), torch.zeros(2200, dtype=torch.long)):  # SGMV, likewise
        x = torch.zeros(len(slots), k, device=DEVICE)
        lt.lora_apply(x, torch.zeros(len(slots), 72, device=DEVICE), a, b, offsets, _on_device(triton_lora_meta(slots)))
    assert {n: len(v) for n, v in launched.items()} == {"_shrink_bgmv": 3, "_expand_bgmv": 3, "_shrink_sgmv": 2,
                                                         "_expand_sgmv": 2}
    for name, calls in launched.items():
        varying = {n for n in calls[0] if len({c[n] for c in calls}) > 1}
        assert varying <= set(lt.PER_STEP), (name, varying)
        if name.startswith("_shrink"):
            assert varying == {"K_CHUNK", "stride_os"}  # the steps did differ in their split
