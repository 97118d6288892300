"""The compiled decoder layers (server.model.compiled) against the eager ones, in float32: the same logits
at every step and the same greedy tokens, for base rows alone (the compiled region, T = 1 and T > 1),
soft-prompt rows alone (embedding hooks: still compiled) and mixed batches of every adapter family (eager,
as their hooks need)."""
from __future__ import annotations

import pytest
import torch
from bottleneck_ref import SEQ_BN, make_bottleneck
from helpers import capture_logits, make_tiny_model, run_staggered

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from quiver.server.model.compiled import compile_layers


def engine(model_dir, tokenizer, eager: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), num_kv_blocks=256, block_size=4,
                                  enforce_eager=eager), tokenizer=tokenizer)


def count_compiled(eng) -> list[int]:
    """How many steps took the compiled region (one counter, updated in place)."""
    region, calls = eng.runner.model.compiled, [0]
    run = region.run

    def counted(*args):
        calls[0] += 1
        return run(*args)
    region.run = counted
    return calls


def compare(engines, adapters: dict, arrivals) -> list[int]:
    """Run the same staggered requests on both engines; their logits at every step and tokens must agree.
    Returns the compiled engine's count of compiled steps."""
    runs = []
    for eng in engines:
        for name, path in adapters.items():
            eng.load_adapter(name, str(path))
        seen = capture_logits(eng)
        calls = count_compiled(eng) if eng.runner.model.compiled is not None else None
        runs.append((run_staggered(eng, arrivals), seen, calls))
    (eager_out, eager_seen, _), (out, seen, calls) = runs
    assert out == eager_out
    assert len(seen) == len(eager_seen)
    for a, b in zip(eager_seen, seen):
        assert a.keys() == b.keys()
        for rid in a:
            # float32 both ways, summed in different orders (inductor's fused loops, the eager C++ norms)
            torch.testing.assert_close(b[rid], a[rid], atol=1e-5, rtol=1e-5)
    return calls


def requests(vocab: int, adapters: list[str | None], at: int, n_tokens: int = 4) -> list:
    g = torch.Generator().manual_seed(at)
    return [(at, torch.randint(3, vocab, (3 + 2 * i,), generator=g).tolist(),
             SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)) for i, _ in enumerate(adapters)]


def test_compiled_steps_equal_eager_ones_for_every_family(tiny_lora_set, tiny_prompt_set, tiny_models, tokenizer,
                                                          tmp_path):
    base_dir, hf, lora_paths = tiny_lora_set
    _, _, prompt_paths = tiny_prompt_set
    make_bottleneck(hf, tmp_path / "seq_bn", "seq_bn", SEQ_BN, seed=800)
    adapters = {"dora": lora_paths["dora"], "rslora_all7": lora_paths["rslora_all7"], **prompt_paths,
                "seq_bn": tmp_path / "seq_bn"}
    vocab = hf.config.vocab_size
    prompt_name = next(iter(prompt_paths))
    engines = [engine(base_dir, tokenizer, eager=True), engine(base_dir, tokenizer, eager=False)]
    # base rows alone (prefill T > 1, then decode at T = 1 and T = 2); a mixed batch of every family
    # joining them; soft-prompt rows alone at the end
    plan = [(0, [None, None], None), (7, [None, *adapters], None), (16, [prompt_name, prompt_name], prompt_name)]
    arrivals, bound = [], {}
    for at, rows, _ in plan:
        for (step, prompt, params), adapter in zip(requests(vocab, rows, at), rows):
            arrivals.append((step, prompt, params))
            bound[len(arrivals) - 1] = adapter
    for eng in engines:  # run_staggered names requests r0, r1, ... in arrival order: route each to its adapter
        add = eng.add_request
        eng.add_request = lambda p, params, request_id, add=add: add(
            p, params, adapter=bound[int(request_id[1:])], request_id=request_id)
    calls = compare(engines, adapters, arrivals)
    assert calls[0] >= 8  # the base-only and soft-prompt-only steps took the compiled region


@pytest.mark.parametrize("arch", ["gemma3_text"])
def test_compiled_steps_equal_eager_ones_on_another_architecture(arch, tmp_path, tokenizer):
    """Sandwich norms, per-head q/k norms, sliding windows with their own rope, soft-caps, scaled embeddings."""
    path = tmp_path / arch
    hf = make_tiny_model(path, arch)
    engines = [engine(path, tokenizer, eager=True), engine(path, tokenizer, eager=False)]
    arrivals = requests(hf.config.vocab_size, [None, None], 0, n_tokens=6) + requests(hf.config.vocab_size, [None], 3)
    assert compare(engines, {}, arrivals)[0] >= 6


def test_no_cxx_compiler_means_eager_steps(monkeypatch, tiny_models, tokenizer, caplog):
    from torch._inductor import config
    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-c++-compiler"))
    base_dir, _ = tiny_models["llama_gqa"]
    eng = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4,
                                 enforce_eager=False), tokenizer=tokenizer)
    assert eng.runner.model.compiled is None
    assert "no C++ compiler (no-such-c++-compiler)" in caplog.text
    assert compile_layers(eng.runner.model) is None
