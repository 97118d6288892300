"""Speculative decoding with prompt-lookup drafts (engine.speculate): the same tokens as plain decoding under
greedy, the same distribution under sampling (against the model's exact probabilities), rows ending where
plain decoding ends them, and the KV cache's bookkeeping through prefix hits and preemption."""
from __future__ import annotations

import pytest
import torch
from helpers import all_blocks_free, make_tiny_model, run_staggered

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.speculate import SpeculativeConfig, lookup

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(model_dir, tokenizer, spec=NGRAM, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), speculative_config=spec,
                                  **{"dtype": "float32", "num_kv_blocks": 128, "block_size": 4, "max_model_len": 128,
                                     **kw}), tokenizer=tokenizer)


def repetitive(seed: int, length: int = 24, period: int = 5) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(3, 500, (period,), generator=g).tolist()
    return (unit * (length // period + 1))[:length]


def drain(engine, metrics: Metrics | None = None) -> dict[str, list[list[int]]]:
    """Run to the end: request id -> the token chunks it got, step by step."""
    chunks: dict[str, list[list[int]]] = {}
    while engine.has_work():
        outs = engine.step()
        if metrics is not None:
            metrics.observe_step(engine.stats(), outs, True)
        for out in outs:
            chunks.setdefault(out.request_id, []).append(out.new_token_ids)
    return chunks


def flat(chunks) -> dict[str, list[int]]:
    return {rid: [t for c in cs for t in c] for rid, cs in chunks.items()}


def test_config_is_vllms_and_other_methods_are_refused_by_name():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (5, 4, 2)
    assert SpeculativeConfig.parse(None) is None
    for bad, says in (({"method": "eagle", "num_speculative_tokens": 2}, "EAGLE"),
                      ({"method": "medusa", "num_speculative_tokens": 2}, "Medusa"),
                      ({"method": "ngram"}, "num_speculative_tokens is required"),
                      ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
                      ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo"), ("{", "not JSON")):
        with pytest.raises(ValueError, match=says):
            SpeculativeConfig.parse(bad)


def test_lookup_takes_what_followed_the_latest_longest_match():
    # the last 2 tokens (7, 8) occur at 1 and at 5: the latest wins; a 3-gram (6, 7, 8) is tried first
    assert lookup([6, 7, 8, 1, 9, 7, 8, 2, 3, 7, 8], 2, 4, 2) == [2, 3]
    assert lookup([6, 7, 8, 1, 9, 6, 7, 8], 3, 4, 2) == [1, 9, 6]
    assert lookup([1, 2, 3, 4], 3, 4, 2) == []  # no earlier match
    assert lookup([5, 1, 2, 1], 2, 4, 1) == [2, 1]  # a 1-gram when allowed


def mixed_families(tiny_lora_set, tiny_prompt_set, tokenizer, spec, metrics: Metrics, max_tokens: int) -> dict:
    """Base, LoRA, DoRA and prompt-tuning rows on repetitive prompts, two of each, to the end (metrics counted
    when speculating): each request's token chunks; every block is free afterwards."""
    base_dir, _, loras = tiny_lora_set
    engine = make_engine(base_dir, tokenizer, spec=spec)
    engine.load_adapter("lora", str(loras["rslora_all7"]))
    engine.load_adapter("dora", str(loras["dora"]))
    engine.load_adapter("pt", str(tiny_prompt_set[2]["prompt_tuning"]))
    for i, adapter in enumerate([None, "lora", "dora", "pt"] * 2):
        engine.add_request(repetitive(i, 12 + 5 * i), SamplingParams(max_tokens=max_tokens, **GREEDY), adapter,
                           request_id=f"r{i}")
    chunks = drain(engine, metrics if spec else None)
    assert all_blocks_free(engine)
    return chunks


def test_greedy_is_unchanged_for_a_mixed_batch_of_families(tiny_lora_set, tiny_prompt_set, plain_tokenizer):
    """Base, LoRA, DoRA and prompt-tuning rows in one batch, on repetitive prompts: the same tokens with
    speculation on as off, with drafts both accepted and rejected, and counted per adapter."""
    results, metrics = [], Metrics()
    for spec in (None, {**NGRAM, "prompt_lookup_min": 1}):
        chunks = mixed_families(tiny_lora_set, tiny_prompt_set, plain_tokenizer, spec, metrics, max_tokens=32)
        results.append(flat(chunks))
    assert results[0] == results[1]
    assert max(len(c) for cs in chunks.values() for c in cs) > 1  # some step emitted several tokens
    for label in ("base", "lora", "dora", "pt"):
        drafted = metrics.registry.get_sample_value("quiver_spec_decode_num_draft_tokens_total", {"adapter": label})
        acc = metrics.registry.get_sample_value("quiver_spec_decode_num_accepted_tokens_total", {"adapter": label})
        assert drafted > 0 and acc is not None, label  # every family proposes, and is counted
    drafted = sum(metrics.registry.get_sample_value("quiver_spec_decode_num_draft_tokens_total", {"adapter": a})
                  for a in ("base", "lora", "dora", "pt"))
    acc = sum(metrics.registry.get_sample_value("quiver_spec_decode_num_accepted_tokens_total", {"adapter": a})
              for a in ("base", "lora", "dora", "pt"))
    assert 0 < acc < drafted


VOCAB, TEMP, TOP_K = 8, 1.3, 6
CONTEXT = [3, 4, 5, 6, 7, 0, 1, 2, 3, 5, 7, 4]  # every token occurs: a 1-gram lookup always finds a draft


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_vocab")
    return path, make_tiny_model(path, "llama_gqa", vocab_size=VOCAB, seed=3)


def exact_pairs(hf) -> torch.Tensor:
    """[V, V] the model's probability of the first two tokens after CONTEXT, under temperature and top-k."""
    def probs(ids):
        with torch.no_grad():
            x = hf(torch.tensor([ids])).logits[0, -1].double() / TEMP
        x[x < x.topk(TOP_K).values[-1]] = float("-inf")
        return x.softmax(-1)
    p1 = probs(CONTEXT)
    return torch.stack([p1[t] * probs(CONTEXT + [t]) for t in range(VOCAB)])


def sample_pairs(model_dir, tokenizer, spec, n: int) -> torch.Tensor:
    engine = make_engine(model_dir, tokenizer, spec=spec, max_num_seqs=256)
    for s in range(n):
        engine.add_request(CONTEXT, SamplingParams(max_tokens=3, temperature=TEMP, top_k=TOP_K, seed=s,
                                                   ignore_eos=True), request_id=f"s{s}")
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for out in flat(drain(engine)).values():
        counts[out[0], out[1]] += 1
    return counts


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; cells expected below 5 pooled into one."""
    n, expected, counts = counts.sum(), p.flatten() * counts.sum(), counts.flatten()
    small = expected < 5
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    c = torch.cat([counts[~small], counts[small].sum()[None]])
    keep = e > 0
    assert n > 0 and (c[~keep] == 0).all()  # nothing drawn where the model gives no mass
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def test_sampling_keeps_the_distribution_and_a_wrong_rule_is_caught(small_vocab, plain_tokenizer, monkeypatch):
    """2000 seeds, first two tokens, with 1-gram drafts for the second: the counts fit the model's exact
    probabilities (chi-square far below a 1e-6 tail) with speculation on; always accepting does not."""
    model_dir, hf = small_vocab
    p = exact_pairs(hf)
    assert p.max() < 0.5  # a spread distribution: drafts are often rejected
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}

    def bound(dof: int) -> float:  # mean + 7 standard deviations of chi-square(dof)
        return dof + 7 * (2 * dof) ** 0.5

    stat, dof = chi_square(sample_pairs(model_dir, plain_tokenizer, spec, 2000), p)
    assert dof >= 15 and stat < bound(dof), (stat, dof)

    def always_accept(sampled, drawn):  # the drafts, then the bonus: a wrong rule
        rows = {}
        for i, seq in enumerate(sampled):
            rows.setdefault(seq.request_id, (seq, []))[1].append(i)
        return {rid: (seq.draft + [drawn[idx[-1]]], idx) for rid, (seq, idx) in rows.items()}

    import quiver.server.engine.llm_engine as llm
    monkeypatch.setattr(llm, "verify", always_accept)
    stat, dof = chi_square(sample_pairs(model_dir, plain_tokenizer, spec, 2000), p)
    assert stat > bound(dof), (stat, dof)


def test_seeded_rows_draw_the_same_tokens_with_speculation_on(small_vocab, plain_tokenizer):
    model_dir, _ = small_vocab
    runs = []
    for spec in (None, NGRAM, NGRAM):
        engine = make_engine(model_dir, plain_tokenizer, spec=spec)
        for s in range(8):
            engine.add_request(CONTEXT * 2, SamplingParams(max_tokens=20, temperature=0.7, seed=s, ignore_eos=True,
                                                           logprobs=1), request_id=f"s{s}")
        runs.append(flat(drain(engine)))
    assert runs[0] == runs[1] == runs[2]


def first_inside_a_run(model_dir, tokenizer, spec) -> tuple[list[int], int]:
    """A prompt and a token its greedy output first meets inside a step's run of accepted drafts (not as the
    run's last token): prompts extended by their own greedy output, so that drafts come from the prompt."""
    kw = dict(max_model_len=256, num_kv_blocks=512)
    starts = [repetitive(i, 10, 5) for i in range(16)]
    engine = make_engine(model_dir, tokenizer, spec=None, **kw)
    for i, p in enumerate(starts):
        engine.add_request(p, SamplingParams(max_tokens=60, **GREEDY), request_id=str(i))
    prompts = [p + out for p, out in zip(starts, flat(drain(engine)).values())]
    engine = make_engine(model_dir, tokenizer, spec=spec, **kw)
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=30, **GREEDY), request_id=str(i))
    for rid, runs in drain(engine).items():
        output, pos = [t for run in runs for t in run], 0
        for run in runs:
            for k, t in enumerate(run[:-1]):
                if output.index(t) == pos + k > 0:
                    return prompts[int(rid)], t
            pos += len(run)
    raise AssertionError("no token first met inside a run")


def test_rows_end_where_plain_decoding_ends_them(tiny_models, plain_tokenizer):
    """max_tokens, a stop token, EOS and a stop string met inside a run of accepted drafts."""
    model_dir, _ = tiny_models["llama_gqa"]
    spec = {**NGRAM, "prompt_lookup_min": 1}
    prompt, inside = first_inside_a_run(model_dir, plain_tokenizer, spec)
    cases = [dict(max_tokens=m) for m in (3, 6, 7, 13)] + [dict(max_tokens=30, stop_token_ids=[inside]),
                                                              dict(max_tokens=30, stop=[f"t{inside}"]),
                                                              dict(max_tokens=30, eos=inside)]
    for case in cases:
        got = []
        for on in (None, spec):
            engine = make_engine(model_dir, plain_tokenizer, spec=on, max_model_len=256, num_kv_blocks=512)
            if "eos" in case:
                engine.eos_token_ids = frozenset({case["eos"]})
            params = {k: v for k, v in case.items() if k != "eos"}
            seq = engine.add_request(prompt, SamplingParams(temperature=0.0, ignore_eos="eos" not in case, **params))
            out = flat(drain(engine))
            got.append((next(iter(out.values())), seq.finish_reason, seq.text))
        assert got[0] == got[1], case
        tokens, reason, _ = got[0]
        if len(case) == 1:
            assert reason == "length" and len(tokens) == case["max_tokens"]
        else:
            assert reason == "stop" and inside not in tokens[:-1]


def test_prefix_cache_and_preemption_with_speculation(tiny_lora_set, plain_tokenizer):
    """Few blocks, shared prefixes, staggered arrivals: preemption happens, cached blocks are reused, and every
    row decodes as it does without speculation; all blocks come back."""
    base_dir, _, loras = tiny_lora_set
    shared = repetitive(11, 16, 4)
    prompts = [shared + repetitive(20 + i, 3 + 2 * i, 3) for i in range(6)]
    arrivals = [(2 * i, p, SamplingParams(max_tokens=20, **GREEDY)) for i, p in enumerate(prompts)]
    got = []
    for spec in (None, NGRAM):
        engine = make_engine(base_dir, plain_tokenizer, spec=spec, num_kv_blocks=26, max_model_len=64,
                             max_num_batched_tokens=24)
        got.append(run_staggered(engine, arrivals))
        assert engine.num_preemptions >= 1
        assert engine.blocks.num_cached > 0
        assert all_blocks_free(engine)
    assert got[0] == got[1]


def test_drafts_never_pass_max_tokens_or_the_context(tiny_models, plain_tokenizer):
    model_dir, _ = tiny_models["llama_gqa"]
    engine = make_engine(model_dir, plain_tokenizer, max_model_len=40)
    seq = engine.add_request(repetitive(3, 30, 3), SamplingParams(max_tokens=10, **GREEDY))
    while engine.has_work():
        engine.step()
        assert seq.num_tokens <= 40 and seq.num_output_tokens <= 10
    assert seq.num_output_tokens == 10
