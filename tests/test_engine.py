"""The engine against transformers: greedy tokens and logits, under continuous batching and preemption."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, all_blocks_free, capture_logits, hf_greedy, run_staggered

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=False)


def make_engine(model_dir, tokenizer, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), **{"dtype": "float32", **kw}), tokenizer=tokenizer)


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 12, 17, 25, 33, 40, 9, 2][:n]
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_staggered_greedy_matches_transformers_with_preemption(name, tiny_models, tokenizer):
    model_dir, hf = tiny_models[name]
    # 20 blocks of 4 tokens cannot hold 8 sequences of ~40 tokens: preemption must happen.
    engine = make_engine(model_dir, tokenizer, block_size=4, num_kv_blocks=20, max_model_len=80,
                         max_num_batched_tokens=24)
    prompts = random_prompts(8, hf.config.vocab_size)
    new_tokens = [24, 16, 20, 12, 20, 8, 16, 30]
    arrivals = [(2 * i, p, SamplingParams(max_tokens=m, **GREEDY)) for i, (p, m) in enumerate(zip(prompts, new_tokens))]
    got = run_staggered(engine, arrivals)
    assert engine.num_preemptions >= 1
    for i, (p, m) in enumerate(zip(prompts, new_tokens)):
        assert got[f"r{i}"] == hf_greedy(hf, p, m), f"prompt {i} (length {len(p)}) diverged"
    assert all_blocks_free(engine)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_step_logits_match_transformers(name, tiny_models, tokenizer):
    """Logits of every prompt position (through prompt logprobs) for a mixed, chunked batch."""
    model_dir, hf = tiny_models[name]
    engine = make_engine(model_dir, tokenizer, block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    prompts = random_prompts(6, hf.config.vocab_size, seed=1)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                               request_id=f"r{i}") for i, p in enumerate(prompts)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    worst = 0.0
    for seq, p in zip(seqs, prompts):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), dim=-1)
        got = torch.tensor([e.logprob for e in seq.prompt_logprobs[1:]])
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:], dtype=torch.long)]
        worst = max(worst, (got - want).abs().max().item() if len(p) > 1 else 0.0)
    assert worst <= 1e-4
    assert steps > 2  # chunking spread the prompts over several steps


def test_raw_logits_match_transformers(tiny_models, tokenizer):
    """Logits themselves, not log-softmax: a decode row and a prefill row in one step."""
    model_dir, hf = tiny_models["llama_gqa"]
    engine = make_engine(model_dir, tokenizer, block_size=4, num_kv_blocks=64)
    seen = capture_logits(engine)
    a, b = random_prompts(2, hf.config.vocab_size, seed=3)
    engine.add_request(a, SamplingParams(max_tokens=3, temperature=0.0), request_id="a")
    engine.step()
    engine.step()
    engine.add_request(b, SamplingParams(max_tokens=1, temperature=0.0), request_id="b")
    engine.step()  # row a decodes its 3rd token while row b prefills
    seq_a = list(a) + hf_greedy(hf, a, 2)
    with torch.no_grad():
        want_a = hf(torch.tensor([seq_a])).logits[0, -1]
        want_b = hf(torch.tensor([b])).logits[0, -1]
    assert (seen[-1]["a"] - want_a).abs().max().item() <= 1e-4
    assert (seen[-1]["b"] - want_b).abs().max().item() <= 1e-4


def test_abort_and_preempt_return_every_block(tiny_models, tokenizer):
    model_dir, hf = tiny_models["llama_gqa"]
    engine = make_engine(model_dir, tokenizer, block_size=4, num_kv_blocks=24, max_model_len=64,
                         max_num_batched_tokens=32)
    prompts = random_prompts(10, hf.config.vocab_size, seed=2) * 3
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=20, temperature=0.8, seed=i), request_id=f"r{i}")
    for step in range(40):
        engine.step()
        if step % 3 == 0:  # abort running, waiting and already-finished requests alike
            engine.abort(f"r{step}")
            engine.abort(f"r{29 - step}")
    assert engine.num_preemptions >= 1
    assert not all_blocks_free(engine)
    while engine.has_work():
        engine.step()
    assert all_blocks_free(engine)
    assert engine.stats().running == engine.stats().waiting == 0


def test_request_validation(tiny_models, tokenizer):
    from quiver.server.families.errors import UnknownAdapter
    from quiver.server.engine.sampling import InvalidParam

    engine = make_engine(tiny_models["llama_gqa"][0], tokenizer, max_model_len=32, num_kv_blocks=8)
    with pytest.raises(InvalidParam) as e:
        engine.add_request([5] * 30, SamplingParams(max_tokens=3))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidParam):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidParam):
        engine.add_request([10_000], SamplingParams())
    with pytest.raises(UnknownAdapter):
        engine.add_request([5], SamplingParams(), adapter="nope")
    assert not engine.has_work()


@pytest.mark.slow
def test_smollm2_staggered_greedy_matches_transformers(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(smollm2_dir), block_size=4, num_kv_blocks=16,
                                    max_model_len=64,
                                    max_num_batched_tokens=64), tokenizer=tokenizer)
    texts = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
             "The three primary colors are", "Water boils at", "A haiku about the sea:\n",
             "In 1969, humans first", "The quick brown fox"]
    prompts = [tokenizer(t).input_ids for t in texts]
    arrivals = [(i // 2, p, SamplingParams(max_tokens=10 + i, **GREEDY)) for i, p in enumerate(prompts)]
    got = run_staggered(engine, arrivals)
    assert engine.num_preemptions >= 1
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf, p, 10 + i), texts[i]
    assert all_blocks_free(engine)
    # and raw logits of one prompt
    seen = capture_logits(engine)
    engine.add_request(prompts[0], SamplingParams(max_tokens=1, temperature=0.0), request_id="one")
    engine.step()
    with torch.no_grad():
        want = hf(torch.tensor([prompts[0]])).logits[0, -1]
    assert (seen[-1]["one"] - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_stay_close(dtype, tiny_models, tokenizer):
    model_dir, hf = tiny_models["llama_gqa"]
    engine = make_engine(model_dir, tokenizer, block_size=4, num_kv_blocks=64, dtype=dtype)
    assert engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    seen = capture_logits(engine)
    prompt = random_prompts(5, hf.config.vocab_size, seed=4)[4]
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), request_id="one")
    engine.step()
    import copy
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
        hf_half = copy.deepcopy(hf).to(getattr(torch, dtype))
        theirs = hf_half(torch.tensor([prompt])).logits[0, -1].float()
    # half precision cannot match fp32 exactly: be no further from it than transformers is
    ours_err = (seen[-1]["one"] - want).abs().max().item()
    assert ours_err <= 2 * (theirs - want).abs().max().item() + 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smollm2_half_precision_says_paris(dtype, smollm2_dir, tokenizer):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), dtype=dtype, kv_cache_memory_mb=32,
                                    max_model_len=256), tokenizer=tokenizer)
    seq = engine.add_request(tokenizer("The capital of France is").input_ids, SamplingParams(max_tokens=4, temperature=0))
    while engine.has_work():
        engine.step()
    assert "Paris" in seq.text
