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


@pytest.fixture
def torch_threads():
    """The test may change torch's thread count (an engine's num_threads sets it): restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_fused_equals_op_by_op(base_dir, tokenizer, loras: dict, spec, threads) -> None:
    """Five staggered requests, base and LoRA rows of two adapters, with and without the fused call: the same
    tokens and the same logits bit for bit, most decode steps fused."""
    arrivals = [(at, repetitive(at + i, 9 + 3 * i), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
                for at, i in ((0, 0), (0, 1), (3, 2), (5, 3), (5, 4))]
    adapters = {"r0": None, "r1": "a", "r2": "b", "r3": None, "r4": "a"}
    runs = []
    for fused in (False, True):
        engine = engine_on(base_dir, tokenizer, speculative_config=spec, num_threads=threads)
        for name, path in loras.items():
            engine.load_adapter(name, str(path))
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


@pytest.fixture
def torch_threads():
    """An engine's num_threads sets torch's thread count: restored after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spec, threads", [(None, None), (NGRAM, None), (None, 1), (NGRAM, 3)])
def test_fused_steps_equal_op_by_op_steps_bit_for_bit(tiny_lora_set, plain_tokenizer, torch_threads, spec, threads):
    base_dir, _, loras = tiny_lora_set
    assert_fused_equals_op_by_op(base_dir, plain_tokenizer, {"a": loras["rslora_all7"], "b": loras["rank_pattern"]},
                                 spec, threads)


@pytest.mark.parametrize("threads", [2, 3])
def test_fused_steps_of_a_wider_model_whose_blocks_the_threads_share(tmp_path, plain_tokenizer, torch_threads,
                                                                      threads):
    """Projections of several blocks for each of 2 or 3 threads (the tiny model's are one or two blocks), taken
    from each other's runs as they finish: the same bits as quiver_cpu::linear's."""
    from quiver.bench.adapters import make_adapters

    hf = make_tiny_model(tmp_path / "base", "llama_gqa", vocab_size=512, hidden_size=256, intermediate_size=544,
                         num_attention_heads=4, num_key_value_heads=2)
    a, b = make_adapters(hf, tmp_path, 2, (8, 16))
    assert_fused_equals_op_by_op(tmp_path / "base", plain_tokenizer, {"a": a, "b": b}, NGRAM, threads)


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


def test_a_plan_is_made_once_for_the_caches_and_lora_buffers_and_freed_with_its_owner(tiny_lora_set, plain_tokenizer,
                                                                                     monkeypatch):
    """The model's tensors reach the kernel once per KV cache and LoRA family (a plan), not with every step; a
    freed plan's id is refused."""
    import gc

    import quiver.server.model.fused as fused_module

    base_dir, _, loras = tiny_lora_set
    made = []
    plan_of = fused_module.DecodePlan
    monkeypatch.setattr(fused_module, "DecodePlan", lambda *args: made.append(plan_of(*args)) or made[-1])
    engine = engine_on(base_dir, plain_tokenizer)
    engine.load_adapter("a", str(loras["rslora_all7"]))
    calls = counted(engine.runner.model)
    for i, adapter in enumerate((None, "a", None, "a")):
        engine.add_request(repetitive(i, 9), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           adapter=adapter)
        while engine.has_work():
            engine.step()
    assert calls[0] >= 16 and len(made) == 2  # every decode step fused, one plan without LoRA and one with
    assert made[0].id != made[1].id
    made.clear()
    monkeypatch.undo()

    layers = FusedLayers(engine.runner.model)  # a second owner of plans, dropped below
    kv = engine.runner.kv_caches
    plan = layers._plan(kv, None)
    assert layers._plan(kv, None) is plan
    freed = plan.id
    del plan, layers
    gc.collect()
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="no plan"):
        torch.ops.quiver_cpu.decode_layers(freed, x, x, x, torch.zeros(1, dtype=torch.long),
                                           torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, 4, dtype=torch.bool), None)
