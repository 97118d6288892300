"""Speculative decoding with a draft model (engine.draft): the same greedy tokens as plain decoding for every
family in one batch, whatever the draft proposes; the output distribution kept under sampling; a target
adapter's own draft LoRA making its drafts agree; the draft's private cache returned as rows end."""
from __future__ import annotations

import gc

import pytest
import torch
from helpers import make_tiny_model
from test_speculative import (CONTEXT, TEMP, TOP_K, VOCAB, chi_square, drain, exact_pairs, flat, make_engine,
                              mixed_families, repetitive)

from quiver.server.engine.metrics import Metrics
from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.speculate import SpeculativeConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


def draft_spec(model_dir, k: int = 3, **kw) -> dict:
    return {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": k, **kw}


def counted(metrics: Metrics, adapter: str) -> tuple[float, float]:
    get = metrics.registry.get_sample_value
    return (get("quiver_spec_decode_num_draft_tokens_total", {"adapter": adapter}) or 0.0,
            get("quiver_spec_decode_num_accepted_tokens_total", {"adapter": adapter}) or 0.0)


@pytest.fixture(scope="module")
def other_draft(tiny_lora_set, tmp_path_factory):
    """A draft of the target's shape and vocabulary with other random weights: its drafts are mostly wrong."""
    path = tmp_path_factory.mktemp("other_draft")
    make_tiny_model(path, "llama_gqa", seed=77)
    return path


def test_config_takes_vllms_draft_model_spelling_and_refuses_what_is_wrong(tiny_lora_set, plain_tokenizer, tmp_path):
    cfg = SpeculativeConfig.parse({"model": "/some/draft", "num_speculative_tokens": 4})
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens, cfg.draft_lora) == ("draft_model", "/some/draft", 4, {})
    for bad, says in (({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
                      ({"model": "d", "num_speculative_tokens": 2, "draft_lora": ["x"]}, "draft_lora must map"),
                      ({"model": "d", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max")):
        with pytest.raises(ValueError, match=says):
            SpeculativeConfig.parse(bad)
    base_dir = tiny_lora_set[0]
    with pytest.raises(ValueError, match="not a model folder"):
        make_engine(base_dir, plain_tokenizer, spec=draft_spec(tmp_path / "nothing"))
    make_tiny_model(tmp_path / "small_vocab", "llama_gqa", vocab_size=64)
    with pytest.raises(ValueError, match="share the tokenizer"):
        make_engine(base_dir, plain_tokenizer, spec=draft_spec(tmp_path / "small_vocab"))


@pytest.mark.parametrize("draft", ["target", "other"])
def test_greedy_is_unchanged_for_a_mixed_batch_of_families(draft, tiny_lora_set, tiny_prompt_set, other_draft,
                                                           plain_tokenizer):
    """Base, LoRA, DoRA and prompt-tuning rows in one batch: the same tokens with drafts from the target's own
    base (mostly accepted) or from another model (mostly rejected) as with no speculation."""
    base_dir = tiny_lora_set[0]
    results, metrics = [], Metrics()
    for spec in (None, draft_spec(base_dir if draft == "target" else other_draft)):
        results.append(flat(mixed_families(tiny_lora_set, tiny_prompt_set, plain_tokenizer, spec, metrics, 24)))
    assert results[0] == results[1]
    drafted, accepted = counted(metrics, "base")
    assert drafted > 0
    if draft == "target":  # the base rows' draft is the target itself: every draft holds
        assert accepted == drafted
    else:
        assert accepted < drafted / 2


def test_a_draft_lora_makes_an_adapters_drafts_agree(tiny_lora_set, plain_tokenizer):
    """The LoRA rows' drafts from the target's base alone are often rejected; with the same LoRA as their draft
    LoRA (merged into the draft's weights) they hold, and the tokens never change."""
    base_dir, _, loras = tiny_lora_set
    lora = str(loras["rslora_all7"])
    outs, rates = [], []
    for spec in (None, draft_spec(base_dir), draft_spec(base_dir, draft_lora={"lora": lora})):
        engine, metrics = make_engine(base_dir, plain_tokenizer, spec=spec), Metrics()
        engine.load_adapter("lora", lora)
        for i in range(3):
            engine.add_request(repetitive(10 + i, 16), SamplingParams(max_tokens=24, **GREEDY), "lora",
                               request_id=f"r{i}")
        outs.append(flat(drain(engine, metrics)))
        if spec is not None:
            drafted, accepted = counted(metrics, "lora")
            rates.append(accepted / drafted)
    assert outs[0] == outs[1] == outs[2]
    assert rates[1] > 0.95 and rates[0] < rates[1] - 0.2, rates


def test_sampling_keeps_the_distribution(plain_tokenizer, tmp_path):
    """2000 seeds, first two tokens, drafts from another small model: the counts fit the target's exact
    probabilities (the rejection rule itself is also checked against a wrong one in test_speculative)."""
    target, draft = tmp_path / "target", tmp_path / "draft"
    hf = make_tiny_model(target, "llama_gqa", vocab_size=VOCAB, seed=3)
    make_tiny_model(draft, "llama_gqa", vocab_size=VOCAB, seed=4)
    p = exact_pairs(hf)
    engine = make_engine(target, plain_tokenizer, spec=draft_spec(draft, k=2), max_num_seqs=256)
    for s in range(2000):
        engine.add_request(CONTEXT, SamplingParams(max_tokens=3, temperature=TEMP, top_k=TOP_K, seed=s,
                                                   ignore_eos=True), request_id=f"s{s}")
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for out in flat(drain(engine)).values():
        counts[out[0], out[1]] += 1
    stat, dof = chi_square(counts, p)
    assert dof >= 15 and stat < dof + 7 * (2 * dof) ** 0.5, (stat, dof)


def test_the_draft_cache_is_returned_and_a_full_one_only_stops_drafting(tiny_lora_set, plain_tokenizer):
    base_dir = tiny_lora_set[0]
    engine = make_engine(base_dir, plain_tokenizer, spec=draft_spec(base_dir), max_num_seqs=16)
    drafts = engine.scheduler.propose.drafts.base
    total = len(drafts.free)
    for i in range(12):  # more rows than the draft cache holds at once: the last ones decode without drafts
        engine.add_request(repetitive(i, 40), SamplingParams(max_tokens=30, **GREEDY), request_id=f"r{i}")
    got = flat(drain(engine))
    plain = make_engine(base_dir, plain_tokenizer)
    for i in range(12):
        plain.add_request(repetitive(i, 40), SamplingParams(max_tokens=30, **GREEDY), request_id=f"r{i}")
    want = flat(drain(plain))
    assert got == want
    gc.collect()
    assert len(drafts.free) == total and not drafts.rows
