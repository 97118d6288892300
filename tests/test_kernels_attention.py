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


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_kernel_matches_reference(shape, kind, block_size):
    from quiver.kernels.attention_triton import prefix_paged_attention as triton_attention

    q, kc, vc, bt, (start, lens, off, prefix) = make_case(*SHAPES[shape], ROWS[kind], block_size=block_size,
                                                        num_blocks=24, seed=block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    # unreferenced cache blocks stay NaN: reading one would poison the output
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = triton_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(start), dev(lens), dev(off), dev(prefix), scale)
    got = got.cpu()
    for r in range(q.shape[0]):
        n = int(lens[r])
        torch.testing.assert_close(got[r, :n].double(), want[r, :n], atol=1e-4, rtol=1e-4)


HALF_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", list(ROWS))
def test_triton_kernel_in_every_dtype_and_head_size(dtype, head_dim, kind):
    """bf16 and fp16 (tensor-core dots on a GPU; in the interpreter widened, as bf16 must be there) and
    head sizes 64 and 128, against float64 maths on the same rounded inputs."""
    from quiver.kernels.attention_triton import prefix_paged_attention as triton_attention

    q, kc, vc, bt, (start, lens, off, prefix) = make_case(4, 2, ROWS[kind], d=head_dim, num_blocks=24, seed=head_dim)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    scale = 1 / math.sqrt(head_dim)
    want = direct(q, kc, vc, bt, start, lens, off, prefix, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = triton_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(start), dev(lens), dev(off), dev(prefix), scale).cpu()
    for r in range(q.shape[0]):
        n = int(lens[r])
        torch.testing.assert_close(got[r, :n].double(), want[r, :n], atol=HALF_TOL[dtype], rtol=HALF_TOL[dtype])
