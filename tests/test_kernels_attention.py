"""Prefix paged attention: the Triton kernel against the PyTorch reference, and the reference
against a direct computation (interpreter on CPU, the real kernel on a GPU)."""
from __future__ import annotations

import math

import pytest
import torch

from quiver.kernels.torch_ops import prefix_paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(heads, kv_heads, rows, block_size=4, d=16, num_blocks=40, seed=0):
    """rows: (q_len, cached tokens before the queries, prefix length) per row."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((kv_heads, num_blocks, block_size, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    free = list(range(num_blocks))
    tables, meta = [], []
    prefix_blocks = {}
    for q_len, cached, prefix in rows:
        if prefix and prefix not in prefix_blocks:  # rows with the same prefix length share it
            n = -(-prefix // block_size)
            prefix_blocks[prefix] = [free.pop(0) for _ in range(n)]
            for i in range(n * block_size):  # padding slots of a prefix block hold zeros, as in serving
                blk, off = prefix_blocks[prefix][i // block_size], i % block_size
                fill = i < prefix
                k_cache[:, blk, off] = torch.randn(kv_heads, d, generator=g) if fill else 0
                v_cache[:, blk, off] = torch.randn(kv_heads, d, generator=g) if fill else 0
        table = list(prefix_blocks.get(prefix, []))
        kv_off = len(table) * block_size
        total = cached + q_len
        own = [free.pop(0) for _ in range(-(-total // block_size))]
        for i in range(total):
            blk, off = own[i // block_size], i % block_size
            k_cache[:, blk, off] = torch.randn(kv_heads, d, generator=g)
            v_cache[:, blk, off] = torch.randn(kv_heads, d, generator=g)
        for i in range(total, len(own) * block_size):  # unwritten tail slots of the last own block
            k_cache[:, own[i // block_size], i % block_size] = 0
            v_cache[:, own[i // block_size], i % block_size] = 0
        tables.append(table + own)
        meta.append((cached, q_len, kv_off, prefix))
    nb = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [t[0]] * (nb - len(t)) for t in tables])
    q = torch.randn(len(rows), max(r[0] for r in rows), heads, d, generator=g)
    cols = [torch.tensor([m[i] for m in meta]) for i in range(4)]
    return q, k_cache, v_cache, block_tables, cols


def direct(q, k_cache, v_cache, block_tables, q_start, q_lens, kv_off, prefix, scale):
    """The definition, one query at a time, in float64."""
    b, nq, h, d = q.shape
    kv, _, bs, _ = k_cache.shape
    out = torch.zeros(b, nq, h, d, dtype=torch.float64)
    for r in range(b):
        keys = [j for j in range(block_tables.shape[1] * bs)]
        for i in range(int(q_lens[r])):
            vis = [j for j in keys if j < prefix[r] or (kv_off[r] <= j <= kv_off[r] + q_start[r] + i)]
            blocks = [int(block_tables[r, j // bs]) for j in vis]
            for head in range(h):
                kvh = head // (h // kv)
                ks = torch.stack([k_cache[kvh, blk, j % bs] for blk, j in zip(blocks, vis)]).double()
                vs = torch.stack([v_cache[kvh, blk, j % bs] for blk, j in zip(blocks, vis)]).double()
                w = torch.softmax(ks @ q[r, i, head].double() * scale, dim=0)
                out[r, i, head] = w @ vs
    return out


SHAPES = {"gqa": (4, 2), "mha": (3, 3), "mqa": (4, 1)}
ROWS = {
    "decode": [(1, 6, 0), (1, 0, 1), (1, 13, 5), (1, 2, 5)],
    "prefill": [(7, 0, 0), (5, 3, 1), (3, 9, 5), (7, 1, 5)],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(ROWS))
def test_reference_matches_definition(shape, kind):
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(*SHAPES[shape], ROWS[kind])
    scale = 1 / math.sqrt(q.shape[-1])
    got = prefix_paged_attention(q, kc, vc, bt, start, lens, off, prefix, scale)
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    for r in range(q.shape[0]):
        n = int(lens[r])
        torch.testing.assert_close(got[r, :n].double(), want[r, :n], atol=1e-5, rtol=1e-5)


def flat(q, lens):
    """Padded [B, Q, H, D] queries -> the step's flat [T, H, D] and each row's first token index."""
    q_flat = torch.cat([q[r, :int(n)] for r, n in enumerate(lens)])
    return q_flat, torch.cumsum(lens, 0) - lens


def run_triton(q, kc, vc, bt, start, lens, off, prefix, scale, **kw):
    """The Triton kernel on the flat form of a make_case step (on the GPU when there is one)."""
    from quiver.kernels.attention_triton import prefix_paged_attention as triton_attention

    q_flat, q_off = flat(q, lens)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return triton_attention(dev(q_flat), dev(kc), dev(vc), dev(bt), dev(q_off), dev(start), dev(lens), dev(off),
                            dev(prefix), scale, **kw).cpu()


def assert_rows_close(got_flat, want, lens, tol):
    """got_flat [T, H, D] against want [B, Q, H, D] padded, row by row."""
    assert got_flat.shape[0] == int(lens.sum())
    torch.testing.assert_close(got_flat.double(), flat(want, lens)[0].double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_kernel_matches_reference(shape, kind, block_size):
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(*SHAPES[shape], ROWS[kind], block_size=block_size,
                                                        num_blocks=24, seed=block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    # unreferenced cache blocks stay NaN: reading one would poison the output
    assert_rows_close(run_triton(q, kc, vc, bt, start, lens, off, prefix, scale), want, lens, 1e-4)


HALF_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", list(ROWS))
def test_triton_kernel_in_every_dtype_and_head_size(dtype, head_dim, kind):
    """bf16 and fp16 (tensor-core dots on a GPU; in the interpreter widened, as bf16 must be there) and
    head sizes 64 and 128, against float64 maths on the same rounded inputs."""
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, ROWS[kind], d=head_dim, num_blocks=24, seed=head_dim)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    scale = 1 / math.sqrt(head_dim)
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    assert_rows_close(run_triton(q, kc, vc, bt, start, lens, off, prefix, scale), want, lens, HALF_TOL[dtype])


# rows whose keys outrun one BLOCK_N tile several times, beside rows too short to reach the later splits
LONG_ROWS = [(1, 150, 0), (1, 3, 5), (1, 97, 5), (6, 120, 0), (2, 0, 0)]


@pytest.mark.parametrize("splits,dtype", [(2, torch.float32), (3, torch.float32), (3, torch.bfloat16)])
def test_split_kv_matches_reference(splits, dtype):
    """Split-KV: each split walks its share of a row's keys, a log-sum-exp combine joins them; splits
    that see no key of a short row weigh nothing. Decode and prefill rows in one launch."""
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, LONG_ROWS, block_size=16, num_blocks=36, seed=splits)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    got = run_triton(q, kc, vc, bt, start, lens, off, prefix, scale, splits=splits)
    assert_rows_close(got, want, lens, HALF_TOL[dtype])


def test_split_count_follows_the_step():
    """Splits only while a launch has too few programs for the GPU and its keys are long."""
    from quiver.kernels.attention_triton import KEYS_PER_SPLIT, MAX_SPLITS, NOMINAL_SMS, kv_splits

    assert kv_splits(8, 8192) == MAX_SPLITS  # batch-1 Llama-8B decode over a long context
    assert kv_splits(8 * 8, 8192) == -(-NOMINAL_SMS // 64)  # batch 8: enough splits to fill the SMs
    assert kv_splits(32 * 8, 8192) == 1  # batch 32 fills the GPU
    assert kv_splits(8, KEYS_PER_SPLIT - 1) == 1  # short contexts: no split
    assert kv_splits(8, 3 * KEYS_PER_SPLIT) == 3


# ---- TritonOps.attention: the step's flat tokens, one launch --------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Records every launch of the attention kernel (grid, arguments by name) and runs it."""
    import inspect

    from quiver.kernels import attention_triton as at

    seen = []
    names = list(inspect.signature(at._prefix_paged_attention.fn).parameters)

    class Spy:
        kernel = at._prefix_paged_attention

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((grid, {**dict(zip(names, args)), **kw}))
                return self.kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(at, "_prefix_paged_attention", Spy())
    return seen


def layout_of(start, lens, off, prefix, bt, block_size):
    from quiver.server.engine.step import RowLayout

    return RowLayout(start, lens, torch.cumsum(lens, 0) - lens, off, prefix, bt, block_size, int(lens.sum()))


# one 48-token chunk beside decode rows and short prefill rows, with and without prefixes
MIXED = [(48, 5, 0), *[(1, c, p) for c, p in ((6, 0), (13, 5), (2, 5), (30, 0), (0, 1))],
         *[(q, c, p) for q, c, p in ((3, 9, 5), (2, 1, 0), (5, 0, 1))], (1, 9, 0), (1, 17, 5), (4, 4, 0)]


def test_triton_ops_attention_memory_follows_real_tokens(launches):
    """K1: a mixed step (a long chunk beside many short rows) reaches the kernel as one launch over the
    flat [T, H, D] queries and output; no tensor of rows x longest chunk is made; the result is the torch
    backend's (kernels.torch_ops) on the same step, with every unreferenced cache block NaN."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from quiver.kernels.ops import TorchOps, TritonOps

    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, MIXED, block_size=4, num_blocks=60, seed=3)
    b, max_q, h, d = q.shape
    t = int(lens.sum())
    assert b * max_q >= 5 * t  # padding would show
    q_flat, _ = flat(q, lens)
    scale = 1 / math.sqrt(d)
    layout = layout_of(start, lens, off, prefix, bt, 4)
    meta = TritonOps.attention_meta(layout, h // 2)

    class Allocations(TorchDispatchMode):
        """The largest tensor any op makes (outputs that alias an input, views and in-place ops, are none)."""
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for x, ret in zip(outs, func._schema.returns):
                if isinstance(x, torch.Tensor) and ret.alias_info is None:
                    self.largest = max(self.largest, x.numel())
            return out

    with Allocations() as mode:
        got = TritonOps.attention(q_flat, kc, vc, meta, scale)
    assert mode.largest <= t * h * d  # the output itself; a padded gather would be b * max_q * h * d
    (grid, args), = launches
    assert args["q_ptr"] is q_flat and args["out_ptr"] is got and got.shape == (t, h, d)
    assert grid[0] == sum(-(-int(n) * 2 // 16) for n in lens)  # tiles in proportion to the real queries
    want = TorchOps.attention(q_flat, kc.nan_to_num(), vc.nan_to_num(), TorchOps.attention_meta(layout, h // 2), scale)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_per_step_arguments_are_not_specialised(launches):
    """K7: every int argument that changes between steps of one model (decode, mixed, split-KV) is
    compiled unspecialised, so a live server compiles no new variant per step shape."""
    from quiver.kernels import attention_triton as at

    for rows, splits in ((ROWS["decode"], 1), (MIXED, 1), (LONG_ROWS, 2)):
        q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, rows, block_size=4, num_blocks=120)
        run_triton(q, kc, vc, bt, start, lens, off, prefix, 0.25, splits=splits)
    first = launches[0][1]
    varying = {k for _, args in launches[1:] for k, v in args.items()
               if type(v) is int and v != first[k]}
    assert {"stride_tb", "pairs"} <= varying  # the steps differ in block count and tokens
    kernel = at._prefix_paged_attention.kernel
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:  # the interpreter's function keeps the decorator's arguments
        dns = kernel.kwargs["do_not_specialize"]
    assert varying <= set(dns), varying


# ---- sliding window and logit soft-cap --------------------------------------------------------------

# decode and prefill rows, prefixes (64, 9, 5, 2 keys) longer and shorter than the windows (64: longer than
# a key tile, so a walk that skipped the prefix would miss whole tiles of it), and rows long enough that a
# window leaves whole key tiles behind (and split-KV has more than one split to fill)
WINDOW_ROWS = [(1, 6, 0), (1, 13, 5), (1, 0, 9), (1, 2, 2), (1, 70, 9), (7, 0, 0), (5, 3, 9), (3, 9, 5),
               (6, 0, 2), (4, 60, 5), (1, 3, 64), (4, 0, 64)]


@pytest.mark.parametrize("window", [1, 3, 7])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_window_and_softcap_match_reference(window, softcap, splits, dtype):
    """The kernel's window (prefix keys counted just before the row's own) and soft-cap equal the torch
    oracle's, on a mixed step, split-KV on and off; unreferenced cache blocks are NaN."""
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, WINDOW_ROWS, block_size=4, num_blocks=110,
                                                        seed=window)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    scale = 1.0  # scores well past the soft-cap, so that it shows
    want = prefix_paged_attention(q.float(), kc.float(), vc.float(), bt, start, lens, off, prefix, scale, window,
                                  softcap)
    got = run_triton(q, kc, vc, bt, start, lens, off, prefix, scale, splits=splits, window=window, softcap=softcap)
    assert_rows_close(got, want, lens, HALF_TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2])
def test_window_walk_starts_at_the_window(splits):
    """With a window the key walk starts at the key tile of the first key a query tile may see: every
    key before that tile is NaN here, so reading one (0 x NaN) would poison the output."""
    from quiver.kernels.attention_triton import config

    rows = [(1, 200, 5), (5, 150, 9)]
    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, rows, block_size=16, num_blocks=40, seed=splits)
    window, bs, block_n = 7, 16, config(16, torch.float32)["BLOCK_N"]
    for r in range(len(rows)):
        first = int(off[r] + start[r]) - window + 1  # cache index of the first query's oldest visible key
        for j in range(first // block_n * block_n):
            kc[:, bt[r, j // bs], j % bs] = float("nan")
            vc[:, bt[r, j // bs], j % bs] = float("nan")
    scale = 1 / math.sqrt(16)
    want = prefix_paged_attention(q, kc, vc, bt, start, lens, off, prefix, scale, window)
    got = run_triton(q, kc, vc, bt, start, lens, off, prefix, scale, splits=splits, window=window)
    assert_rows_close(got, want, lens, 1e-4)


@pytest.mark.parametrize("windows", [(), (3,), (2, 9)])
def test_a_decode_steps_group_equals_the_general_build(windows):
    """kernels.torch_meta's decode group (one query a row, every row in one group, a few ops) against the group
    _masked_group builds for the same rows: slots, tables, masks and windowed masks, with adapter prefixes."""
    from quiver.kernels.torch_meta import _decode_group, _masked_group, mark_in_order, plan_attention
    from quiver.server.engine.step import RowLayout

    g = torch.Generator().manual_seed(len(windows))
    for b in (1, 3, 6):
        starts = torch.randint(0, 20, (b,), generator=g)
        prefix = torch.randint(0, 3, (b,), generator=g) * torch.randint(0, 2, (b,), generator=g)
        kv_off = prefix.clone()
        tables = torch.randint(1, 50, (b, 12), generator=g)
        layout = RowLayout(starts, torch.ones(b, dtype=torch.long), torch.arange(b), kv_off, prefix, tables, 4, b)
        plan = plan_attention(starts.tolist(), [1] * b, kv_off.tolist())
        assert len(plan) == 1
        want = [_masked_group(plan[0], layout, windows)]
        mark_in_order(want, b)
        got = _decode_group(layout, int((kv_off + starts).max()) + 1, windows)
        w = want[0]
        assert got.slots.in_order and w.slots.in_order and got.slots.max_q == w.slots.max_q == 1
        assert torch.equal(got.slots.query_index, w.slots.query_index) and got.slots.valid_index is None
        assert torch.equal(got.block_tables, w.block_tables) and torch.equal(got.allowed, w.allowed)
        assert got.allowed.shape == w.allowed.shape and got.windows == w.windows
        assert (got.windowed is None) == (w.windowed is None)
        if windows:
            assert torch.equal(got.windowed, w.windowed)
