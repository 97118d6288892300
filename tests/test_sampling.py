"""Sampling: seeded determinism, top-k/top-p filtering, the sampled distribution, stop conditions."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import run_staggered

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampler import filter_top_k_top_p, hashed_uniform, prepare, sample
from quiver.server.engine.sampling import InvalidParam, SamplingParams
from quiver.server.engine.sequence import Sequence


@pytest.fixture(scope="module")
def engine_factory(tiny_models, tokenizer):
    def make(**kw):
        kw.setdefault("num_kv_blocks", 128)
        kw.setdefault("block_size", 4)
        kw.setdefault("dtype", "float32")
        return LLMEngine(EngineConfig(model=str(tiny_models["llama_gqa"][0]), **kw), tokenizer=tokenizer)
    return make


def test_hashed_uniform_is_deterministic_and_uniform():
    seeds = torch.tensor([1, 2, 1]); steps = torch.tensor([0, 0, 1])
    u = hashed_uniform(seeds, steps, 50_000)
    assert torch.equal(u, hashed_uniform(seeds, steps, 50_000))
    assert ((u > 0) & (u < 1)).all()
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01


def test_top_k_top_p_filter_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    top_k = torch.tensor([0, 1, 5, 0, 3, 40])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.3, 0.9])
    got = filter_top_k_top_p(logits, top_k, top_p)
    for r in range(6):
        order = logits[r].argsort(descending=True)
        keep = order[: top_k[r]] if top_k[r] > 0 else order
        probs = torch.softmax(logits[r, keep], dim=0)
        mass, n = 0.0, 0
        while n < len(keep) and mass <= top_p[r] + 1e-7:  # keep until the nucleus is covered
            mass += probs[n].item(); n += 1
            if mass >= top_p[r]:
                break
        kept = set(keep[:n].tolist())
        assert {i for i in range(40) if torch.isfinite(got[r, i])} == kept, r


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits / 0.7, dim=0)
    counts = torch.zeros(5)
    params = SamplingParams(temperature=0.7)
    n = 4000
    seqs = [Sequence(f"s{i}", [1], params, seed=i) for i in range(n)]
    tokens = sample(logits.expand(n, 5).contiguous(), prepare(seqs, 5)).tokens
    counts.index_add_(0, torch.tensor(tokens), torch.ones(n))
    # each frequency within 5 standard errors of its probability
    se = torch.sqrt(probs * (1 - probs) / n)
    assert ((counts / n - probs).abs() <= 5 * se).all(), (counts / n, probs)


def test_greedy_rows_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    seqs = [Sequence("a", [1], SamplingParams(temperature=0, logprobs=2), seed=0),
            Sequence("b", [1], SamplingParams(temperature=1.0, top_k=1), seed=0)]
    res = sample(logits, prepare(seqs, 3))
    assert res.tokens == [1, 0]
    lp = torch.log_softmax(logits, dim=-1)
    assert math.isclose(res.logprobs[0], lp[0, 1].item(), rel_tol=1e-6)
    assert [t for t, _ in res.top[0]] == [1, 2]


def test_same_seed_same_output_whatever_the_neighbours(engine_factory):
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = run_staggered(engine_factory(), [(0, [5, 6, 7], SamplingParams(**params))])["r0"]
    crowd = [(0, [9, 8, 7, 6], SamplingParams(max_tokens=12, temperature=1.2)),
             (1, [5, 6, 7], SamplingParams(**params)),
             (2, [11, 12], SamplingParams(max_tokens=12, temperature=0.0))]
    crowded = run_staggered(engine_factory(), crowd)["r1"]
    assert alone == crowded
    other = run_staggered(engine_factory(), [(0, [5, 6, 7], SamplingParams(**{**params, "seed": 99}))])["r0"]
    assert other != alone


def test_unseeded_requests_differ(engine_factory):
    engine = engine_factory()
    p = SamplingParams(max_tokens=16, temperature=1.0)
    outs = run_staggered(engine, [(0, [5, 6, 7], p), (0, [5, 6, 7], p)])
    assert outs["r0"] != outs["r1"]


def test_a_vanishing_temperature_is_greedy():
    """logits / 1e-40 overflow float32: such a temperature picks the top token, as 0 does."""
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.5], [-4.0, -1.0, -3.0, -2.0]])
    for t in (1e-40, 1e-30, 1e-8):
        seqs = [Sequence(f"s{i}", [1], SamplingParams(temperature=t), seed=i) for i in range(2)]
        assert sample(logits.clone(), prepare(seqs, 4)).tokens == [1, 1], t


def test_the_whole_seed_draws():
    """Seeds that differ only above their low 32 bits draw differently."""
    steps = torch.tensor([0, 0])
    u = hashed_uniform(torch.tensor([5, 5 + 2**32]), steps, 1000)
    assert not torch.equal(u[0], u[1])
    u = hashed_uniform(torch.tensor([5 + 2**40, 5 + 2**62]), steps, 1000)
    assert not torch.equal(u[0], u[1])


def test_unseeded_requests_differ_across_engines_with_no_seed_flag(engine_factory):
    """Two replicas (or one restarted) started alike do not draw the same unseeded sequence."""
    p = SamplingParams(max_tokens=16, temperature=1.0)
    first = [run_staggered(engine_factory(), [(0, [5, 6, 7], p)])["r0"] for _ in range(2)]
    assert first[0] != first[1]
    fixed = [run_staggered(engine_factory(seed=3), [(0, [5, 6, 7], p)])["r0"] for _ in range(2)]
    assert fixed[0] == fixed[1]  # --seed still makes unseeded requests reproducible


def _run_one(engine, prompt, params):
    seq = engine.add_request(prompt, params)
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == seq.request_id]
    return seq, outs


def test_stop_string_token_and_length(engine_factory):
    prompt = [5, 6, 7, 8]
    base, outs = _run_one(engine_factory(), prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert base.finish_reason == "length" and base.num_output_tokens == 20
    assert "".join(o.new_text for o in outs) == base.text
    # a stop token id: output ends with it, and its text is not included
    stop_tok = base.output_ids[5]
    first = base.output_ids.index(stop_tok)
    seq, _ = _run_one(engine_factory(), prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                              stop_token_ids=[stop_tok]))
    assert seq.finish_reason == "stop" and seq.output_ids == base.output_ids[:first + 1]
    # a stop string taken from the middle of the text
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    seq, outs = _run_one(engine_factory(), prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                                 stop=[stop]))
    assert seq.finish_reason == "stop"
    streamed = "".join(o.new_text for o in outs)
    assert streamed == text[: text.index(stop)] and stop not in streamed


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("top_k", -2), ("logprobs", 6)])
def test_invalid_params_name_their_field(field, value):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == field
