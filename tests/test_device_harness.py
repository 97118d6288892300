"""The whole engine on torch's `meta` device, in float32 and bfloat16 (and float16 on Llama), with a dispatch
mode that fails on any operation mixing devices or floating dtypes: what a GPU run would hit first, found
without a GPU. Every architecture (a tiny model of each): on Llama every adapter family in one batch, on
the others base rows beside prompt and prefix tuning and LoRA (none on Phi-3's fused modules yet). Run
twice: on the torch ops, and on the Triton ops' path with the two kernel launches replaced by checks of
what they would receive (device, dtype, layout, window and soft-cap)."""
from __future__ import annotations

import pytest
import torch
from bottleneck_ref import DOUBLE_SEQ_BN, SEQ_BN, make_bottleneck
from helpers import NEW_ARCHS, make_tiny_model
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
from peft_fixtures import make_adapter, make_prompt_adapter
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
        # the kernel's runtime arguments: an i32 window and an fp32 soft-cap
        assert window is None or (type(window) is int and window > 0), window
        assert softcap is None or (type(softcap) is float and softcap > 0), softcap
        CheckedTritonOps.seen.append("attention")
        CheckedTritonOps.seen += ["window"] * (window is not None) + ["softcap"] * (softcap is not None)
        return torch.empty_like(q)

    @staticmethod
    def lora_apply(x, y, buf, meta):
        from quiver.kernels.lora_triton import _check

        _check(x, y, buf.a, buf.b, buf.offsets, meta)
        CheckedTritonOps.seen.append("lora")


def read_all(base_dir, paths: dict, tokenizer) -> dict:
    """Every adapter read once on the CPU (as a worker thread reads them for a GPU engine)."""
    cpu = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4,
                                 max_loras=8), tokenizer=tokenizer)
    return {name: cpu.read_adapter(name, str(path)).result() for name, path in paths.items()}


def llama_reads(request, tmp_path_factory, tokenizer):
    """Every family, bottlenecks included, on the tiny GQA Llama."""
    base_dir, hf, lora_paths = request.getfixturevalue("tiny_lora_set")
    _, _, prompt_paths = request.getfixturevalue("tiny_prompt_set")
    root = tmp_path_factory.mktemp("bottlenecks")
    make_bottleneck(hf, root / "relu", "relu", SEQ_BN, seed=1)
    make_bottleneck(hf, root / "swish", "swish", DOUBLE_SEQ_BN, seed=2)
    return base_dir, read_all(base_dir, {**lora_paths, **prompt_paths, "relu": root / "relu",
                                         "swish": root / "swish"}, tokenizer)


def arch_reads(arch: str, tmp_path_factory, tokenizer):
    """A tiny model of `arch` with prompt tuning, prefix tuning (its keys inside the sliding windows) and,
    where its modules are not fused (Phi-3's are), LoRA on every linear module."""
    root = tmp_path_factory.mktemp(arch)
    hf = make_tiny_model(root / "model", arch)
    lm = TaskType.CAUSAL_LM
    make_prompt_adapter(hf, root / "prompt", PromptTuningConfig(task_type=lm, num_virtual_tokens=5), seed=1)
    make_prompt_adapter(hf, root / "prefix", PrefixTuningConfig(task_type=lm, num_virtual_tokens=7), seed=2)
    paths = {"prompt": root / "prompt", "prefix": root / "prefix"}
    if arch != "phi3":
        make_adapter(hf, root / "lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed=3)
        paths["lora"] = root / "lora"
    return root / "model", read_all(root / "model", paths, tokenizer)


@pytest.fixture(scope="module")
def reads(request, tmp_path_factory, plain_tokenizer):
    """(architecture, base dir, name -> adapter read on the CPU) for the architecture request.param."""
    if request.param == "llama":
        return request.param, *llama_reads(request, tmp_path_factory, plain_tokenizer)
    return request.param, *arch_reads(request.param, tmp_path_factory, plain_tokenizer)


WINDOWED, SOFTCAPPED = {"gemma2", "gemma3_text"}, {"gemma2"}  # in their tiny configs (tests.helpers)
CASES = [("llama", "float32"), ("llama", "bfloat16"), ("llama", "float16"),
         *[(arch, dtype) for arch in NEW_ARCHS for dtype in ("float32", "bfloat16")]]


@pytest.mark.parametrize("kernels", ["torch", "checked"])
@pytest.mark.parametrize("reads,dtype", CASES, indirect=["reads"])
def test_engine_on_meta_mixes_no_device_or_dtype(reads, plain_tokenizer, monkeypatch, kernels, dtype):
    arch, base_dir, reads = reads
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
    if kernels == "checked":  # each kernel, and the window and soft-cap, reached the Triton path
        wanted = {"attention", *["lora"] * (arch != "phi3"), *["window"] * (arch in WINDOWED),
                  *["softcap"] * (arch in SOFTCAPPED)}
        assert set(CheckedTritonOps.seen) == wanted

