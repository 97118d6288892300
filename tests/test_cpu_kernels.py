"""Quiver's C++ CPU kernels (kernels/cpu_kernels.cpp) against their torch definitions: the few-row bfloat16
projection (on the blocked layout, and in place on oneDNN's packed weights where that is the layout), paged
attention, RMS norm, rope and few-row LoRA. Where the machine has no AVX512-BF16 the projection runs its plain
loop; everything else is the same code on every CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quiver.kernels import cpu_kernels, torch_ops
from quiver.kernels.torch_meta import torch_adapter_meta
from quiver.server.model.llama import torch_rms_norm
from quiver.server.model.packed import PackedWeight
from quiver.server.model.rope import torch_rope

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: the kernels cannot build")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("n,k", [(960, 576), (100, 70), (8, 8), (130, 64)])
@pytest.mark.parametrize("rows", [1, 3, 6, 8, 13])
def test_blocked_linear_is_x_w_t_plus_bias(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    w, bias = (torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16())
    x = torch.randn(rows, k, generator=g).bfloat16()
    want = x.float() @ w.float().T + bias.float()
    got = cpu_kernels.linear(x, cpu_kernels.blocked(w), n, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # one rounding to bfloat16 of a float32 sum: within half an ulp of the exact value (plus summation order)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)
    no_bias = cpu_kernels.linear(x, cpu_kernels.blocked(w), n, None)
    torch.testing.assert_close(no_bias.float(), want - bias.float(), rtol=2 ** -8, atol=1e-3)


def test_blocked_linear_gives_the_same_bits_at_any_thread_count():
    """Each block summed whole by whichever thread takes it (the threads start on equal runs of the 15 blocks and
    take the last ones left of another's): 1, 2, 4, 7 and 16 threads give the same bits, call after call."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(960, 576, generator=g).bfloat16(), torch.randn(6, 576, generator=g).bfloat16()
    blocks, before = cpu_kernels.blocked(w), torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 4, 7, 16):
            torch.set_num_threads(threads)
            got += [cpu_kernels.linear(x, blocks, 960, None) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0].float(), x.float() @ w.float().T, rtol=2 ** -8, atol=1e-3)
    assert all(torch.equal(got[0], y) for y in got[1:])


def test_packed_weights_read_in_place_agree_with_onednn():
    """Where oneDNN's packed layout is the kernel's (AVX512-BF16), the view shares its memory and few-row
    products agree with oneDNN's; a weight that is not the packed one is refused."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 96, generator=g).bfloat16()
    packed = PackedWeight(w)
    if packed.blocks is None:
        assert not cpu_kernels.fast() or cpu_kernels.onednn_blocks(packed.packed, w) is None
        return
    assert packed.blocks.data_ptr() == torch.ops.mkldnn.data_ptr(packed.packed)
    assert cpu_kernels.onednn_blocks(packed.packed, w + 1) is None
    for rows in (1, 5, 8, 9):  # 9: beyond FEW_ROWS, oneDNN itself
        x = torch.randn(rows, 96, generator=g).bfloat16()
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed.packed, None, "none", [], "")
        torch.testing.assert_close(packed.linear(x, None).float(), onednn.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,q,h,kv,d,bs,nb,softcap", [(1, 1, 9, 3, 64, 16, 8, None), (3, 2, 8, 2, 32, 16, 4, 30.0),
                                                      (2, 4, 4, 4, 80, 8, 5, None)])
def test_paged_attention_equals_torch(dtype, b, q, h, kv, d, bs, nb, softcap):
    g = torch.Generator().manual_seed(b * 100 + q)
    k_cache, v_cache = (torch.randn(kv, 40, bs, d, generator=g).to(dtype) for _ in range(2))
    query = torch.randn(b, q, h, d, generator=g).to(dtype)
    tables = torch.randint(0, 40, (b, nb), generator=g)
    allowed = torch.rand(b, q, nb * bs, generator=g) < 0.6
    allowed[..., 0] = True
    want = torch_ops.paged_attention(query, k_cache, v_cache, tables, allowed, 0.125, softcap)
    got = cpu_kernels.paged_attention(query, k_cache, v_cache, tables, allowed, 0.125, softcap)
    if dtype == torch.bfloat16:  # the same roundings, in the same places
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offset,fp32_product", [((3, 576), 0.0, False), ((2, 9, 64), 1.0, False),
                                                       ((5, 100), 1.0, True), ((1, 17), 0.0, True)])
def test_rms_norm_equals_torch(dtype, shape, offset, fp32_product):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    want = torch_rms_norm(x, w, 1e-5, offset, fp32_product)
    got = cpu_kernels.rms_norm(x, w, 1e-5, offset, fp32_product)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,d,r", [(1, 9, 64, 64), (3, 4, 64, 32), (2, 3, 96, 64)])
def test_rope_equals_torch_on_a_strided_view(dtype, t, h, d, r):
    g = torch.Generator().manual_seed(t * h + r)
    qkv = torch.randn(t, 2 * h * d, generator=g).to(dtype)
    x = qkv[:, :h * d].reshape(t, h, d)  # a view into a fused projection, as the model passes it
    cos, sin = (torch.randn(t, r, generator=g).to(dtype) for _ in range(2))
    want, got = torch_rope(x, cos, sin), cpu_kernels.rope(x, cos, sin)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [[2], [-1, 1, 3, 1], [0, -1, -1, 2, 2, 2, 1, 0]])
def test_lora_add_equals_torch_lora_apply(dtype, slots):
    """Every row its own adapter (or none), B block-diagonal over three slices of different widths."""
    g = torch.Generator().manual_seed(len(slots))
    num_slots, rank, k, offsets = 4, 8, 96, (0, 96, 128, 160)
    a = torch.randn(num_slots, 3 * rank, k, generator=g).to(dtype)
    b = torch.zeros(num_slots, 3 * rank, offsets[-1], dtype=dtype)
    for i in range(3):
        b[:, i * rank:(i + 1) * rank, offsets[i]:offsets[i + 1]] = torch.randn(
            num_slots, rank, offsets[i + 1] - offsets[i], generator=g).to(dtype)
    token_slots = torch.tensor(slots)
    x, y = torch.randn(len(slots), k, generator=g).to(dtype), torch.randn(len(slots), offsets[-1], generator=g).to(dtype)
    want = y.float().clone()
    torch_ops.lora_apply(x.float(), want, a.float(), b.float(), torch_adapter_meta(token_slots), offsets)
    got = y.clone()
    cpu_kernels.lora_add_(got, x, a, b, token_slots, offsets, rank)
    assert torch.equal(got[token_slots < 0], y[token_slots < 0])
    if dtype == torch.bfloat16:  # one rounding into y
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_turned_off_by_the_environment():
    code = "from quiver.kernels import cpu_kernels; print(cpu_kernels.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "QUIVER_CPU_KERNELS": "0"})
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_equals_torch(dtype):
    g = torch.Generator().manual_seed(5)
    caches = [torch.randn(3, 10, 4, 16, generator=g).to(dtype) for _ in range(2)]
    k, v = (torch.randn(6, 3, 16, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([0, 5, 39, 17, 18, 2])
    want = [c.clone() for c in caches]
    torch_ops.write_kv(*want, k, v, slots)
    cpu_kernels.write_kv_(*caches, k, v, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels.write_kv_(*caches, k, v, torch.tensor([0, 1, 2, 3, 4, 40]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(cpu_kernels.ACT_KINDS))
def test_act_mul_equals_torch(dtype, activation):
    from quiver.server.model.llama import ACT
    g = torch.Generator().manual_seed(6)
    gate_up = (torch.randn(5, 2 * 96, generator=g) * 3).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want, got = ACT[activation](gate) * up, cpu_kernels.act_mul(gate_up, activation)
    if dtype == torch.bfloat16:  # the same two roundings; exp and tanh may differ in their last float32 bit
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert (got != want).float().mean() < 0.02
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_and_finiteness():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 1000 + 7, generator=g)
    logits[1, 5] = logits[1, 900] = 50.0  # a tie: the first one
    logits[2, -1] = 60.0  # the maximum in the tail beyond whole vectors
    logits[3, 17] = float("nan")
    logits[4, 400] = float("-inf")
    logits[5, 1000] = float("inf")
    tokens, finite = cpu_kernels.greedy(logits)
    assert finite.tolist() == [True, True, True, False, False, False]
    assert torch.equal(tokens[finite], logits.argmax(dim=-1)[finite])
    assert tokens[1] == 5 and tokens[2] == 1006
