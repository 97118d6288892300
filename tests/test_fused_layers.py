"""Every decoder layer of a few-row step in one C++ call (server.model.fused) against the op-by-op path it
replaces: in bfloat16 the same logits bit for bit at every step, for base rows, LoRA rows of two adapters
mixed with base rows, speculative verification steps and prefills (which stay op by op), and the layouts and
steps it must leave to the op-by-op path."""
from __future__ import annotations

import pytest
import torch
from helpers import capture_logits, make_tiny_model, run_staggered
from test_speculative import NGRAM, repetitive

from quiver.kernels import cpu_kernels
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from quiver.server.model.fused import FusedLayers

pytestmark = pytest.mark.skipif(not cpu_kernels.fast(), reason="the few-row projection kernel needs AVX512-BF16")


def engine_on(model_dir, tokenizer, dtype="bfloat16", **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=dtype, model=str(model_dir), num_kv_blocks=256, block_size=4, max_model_len=128,
                                  max_loras=2, max_lora_rank=16, enable_prefix_caching=False, **kw),
                     tokenizer=tokenizer)


def counted(model) -> list[int]:
    """How many steps the fused call served (one counter, updated in place)."""
    fused, calls = model.fused, [0]

    def call(*args):
        out = fused(*args)
        calls[0] += out is not None
        return out
    model.fused = call
    return calls


@pytest.mark.parametrize("spec", [None, NGRAM])
def test_fused_steps_equal_op_by_op_steps_bit_for_bit(tiny_lora_set, plain_tokenizer, spec):
    base_dir, _, loras = tiny_lora_set
    arrivals = [(at, repetitive(at + i, 9 + 3 * i), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
                for at, i in ((0, 0), (0, 1), (3, 2), (5, 3), (5, 4))]
    adapters = {"r0": None, "r1": "lora", "r2": "rs", "r3": None, "r4": "lora"}
    runs = []
    for fused in (False, True):
        engine = engine_on(base_dir, plain_tokenizer, speculative_config=spec)
        engine.load_adapter("lora", str(loras["rslora_all7"]))
        engine.load_adapter("rs", str(loras["rank_pattern"]))
        model = engine.runner.model
        assert model.fused is not None
        if not fused:
            model.fused = None
        calls = counted(model) if fused else None
        add = engine.add_request
        engine.add_request = lambda p, params, request_id, add=add: add(p, params, adapter=adapters[request_id],
                                                                         request_id=request_id)
        seen = capture_logits(engine)
        runs.append((run_staggered(engine, arrivals), seen, calls))
    (plain, plain_seen, _), (out, seen, calls) = runs
    assert out == plain
    assert calls[0] >= 8  # decode steps of base and LoRA rows took it
    assert len(seen) == len(plain_seen)
    for a, b in zip(plain_seen, seen):
        assert a.keys() == b.keys() and all(torch.equal(a[r], b[r]) for r in a)


def test_layouts_and_steps_it_leaves_alone(tiny_models, tmp_path):
    """float32, Gemma 2's sandwich norms and soft-caps, Qwen 3's q/k norms: no fused path at all."""
    from quiver.kernels.ops import ops_for
    from quiver.server.model.config import ModelConfig
    from quiver.server.model.llama import LlamaModel

    def model_of(name, dtype):
        path = tiny_models[name][0] if name in tiny_models else tmp_path / name
        if name not in tiny_models:
            make_tiny_model(path, name)
        m = LlamaModel(ModelConfig.from_dir(path), ops_for("cpu"), dtype)
        m.load_weights(path)
        return m

    assert FusedLayers.of(model_of("llama_gqa", torch.bfloat16)) is not None
    assert FusedLayers.of(model_of("llama_gqa", torch.float32)) is None
    for name in ("gemma2", "qwen3"):
        assert FusedLayers.of(model_of(name, torch.bfloat16)) is None, name
