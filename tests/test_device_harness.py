"""The whole engine on torch's `meta` device, every adapter family in one batch, in float32, bfloat16 and
float16, with a dispatch mode that fails on any operation mixing devices or floating dtypes: what a GPU
run would hit first, found without a GPU. Run twice: on the torch ops, and on the Triton ops' path with
the two kernel launches replaced by checks of what they would receive (device, dtype, layout)."""
from __future__ import annotations

import pytest
import torch
from bottleneck_ref import DOUBLE_SEQ_BN, SEQ_BN, make_bottleneck
from torch.utils._python_dispatch import TorchDispatchMode

import quiver.server.engine.sampler as sampler
from quiver.kernels import ops
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

CASTS = {"aten::_to_copy", "aten::copy_", "aten::lift_fresh", "aten::detach", "aten::clone", "aten::_local_scalar_dense"}


class MixChecker(TorchDispatchMode):
    """Records every aten op whose tensor arguments (0-dim ones aside) span devices, or whose floating
    arguments span dtypes; casts and copies are how dtypes and devices are meant to change."""

    def __init__(self):
        super().__init__()
        self.mixes: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name not in CASTS:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and t.dim() > 0]
            devices = {t.device for t in tensors}
            floats = {t.dtype for t in tensors if t.is_floating_point()}
            if len(devices) > 1 or len(floats) > 1:
                self.mixes.add(f"{name}: {sorted(map(str, devices))} {sorted(map(str, floats))}")
        return func(*args, **kwargs)


class CheckedTritonOps(ops.TritonOps):
    """The Triton path's layout and dispatch, with the kernel launches replaced by checks of their inputs."""
    name = "triton"
    seen: list[str] = []

    @staticmethod
    def attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
        from quiver.kernels.attention_triton import _check

        (m,) = meta
        _check(q, k_cache, v_cache, m.block_tables, (m.q_offset, m.q_start, m.q_lens, m.kv_offset, m.prefix_len),
               m.tiles)
        CheckedTritonOps.seen.append("attention")
        return torch.empty_like(q)

    @staticmethod
    def lora_apply(x, y, buf, meta):
        from quiver.kernels.lora_triton import _check

        _check(x, y, buf.a, buf.b, buf.offsets, meta)
        CheckedTritonOps.seen.append("lora")


@pytest.fixture(scope="module")
def adapter_reads(tiny_lora_set, tiny_prompt_set, plain_tokenizer, tmp_path_factory):
    """Every family's adapters read once on the CPU (as a worker thread reads them for a GPU engine)."""
    base_dir, hf, lora_paths = tiny_lora_set
    _, _, prompt_paths = tiny_prompt_set
    root = tmp_path_factory.mktemp("bottlenecks")
    make_bottleneck(hf, root / "relu", "relu", SEQ_BN, seed=1)
    make_bottleneck(hf, root / "swish", "swish", DOUBLE_SEQ_BN, seed=2)
    paths = {**lora_paths, **prompt_paths, "relu": root / "relu", "swish": root / "swish"}
    cpu = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4,
                                 max_loras=len(lora_paths)),
                    tokenizer=plain_tokenizer)
    return base_dir, {name: cpu.read_adapter(name, str(path)).result() for name, path in paths.items()}


@pytest.mark.parametrize("kernels", ["torch", "checked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_engine_on_meta_mixes_no_device_or_dtype(adapter_reads, plain_tokenizer, monkeypatch, kernels, dtype):
    base_dir, reads = adapter_reads
    monkeypatch.setitem(ops.BACKENDS, "checked", CheckedTritonOps)
    # the step's one device-to-host copy (tokens, finite flags, logprobs) cannot read a meta tensor
    monkeypatch.setattr(sampler, "to_host", lambda t: [[1.0] * t.shape[1] for _ in range(t.shape[0])])
    engine = LLMEngine(EngineConfig(model=str(base_dir), device="meta", dtype=dtype, kernels=kernels,
                                    num_kv_blocks=64, block_size=4, max_loras=8), tokenizer=plain_tokenizer)
    for read in reads.values():  # host copies registered into the meta engine's families
        engine.adopt_adapter(read.adapter, read.kind, read.path)
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0.8, top_k=5, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0.7, logprobs=2, ignore_eos=True)]
    CheckedTritonOps.seen = []
    checker = MixChecker()
    with checker:
        for i, name in enumerate([None, *reads]):
            engine.add_request([5 + i, 6, 7, 8, 9][: 2 + i % 4], params[i % 3], adapter=name)
        while engine.has_work():
            assert all(out.error is None for out in engine.step())
    assert not checker.mixes, "\n".join(sorted(checker.mixes))
    if kernels == "checked":
        assert {"attention", "lora"} <= set(CheckedTritonOps.seen)
