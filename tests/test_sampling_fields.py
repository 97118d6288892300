"""Penalties, logit_bias, min_tokens, allowed_token_ids, bad words and min_p, per row in mixed-adapter
batches, against an oracle that applies the same definition to transformers' (or PEFT's) logits:
Hugging Face's own logits processors where it has one, the OpenAI formula where it does not."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from helpers import capture_logits
from peft_fixtures import forward_greedy, peft_greedy

EOS = 2
N = 8


def presence_frequency(prompt_len: int, presence: float, frequency: float):
    """OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting output tokens."""
    def process(seq, scores):
        counts = torch.bincount(torch.tensor(seq[prompt_len:], dtype=torch.long), minlength=scores.shape[1]).double()
        return scores - frequency * counts - presence * (counts > 0).double()
    return process


def repetition(penalty: float):
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    return lambda seq, scores: hf(torch.tensor([seq]), scores.clone())


def bias(entries: dict[int, float]):
    def process(seq, scores):
        scores = scores.clone()
        for token, b in entries.items():
            scores[0, token] += b
        return scores
    return process


def min_tokens_with_bias(prompt_len: int, n: int, entries: dict[int, float]):
    hf = MinNewTokensLengthLogitsProcessor(prompt_len, n, EOS)
    add = bias(entries)
    return lambda seq, scores: hf(torch.tensor([seq]), add(seq, scores))


def allowed(ids: list[int]):
    def process(seq, scores):
        keep = torch.full_like(scores, float("-inf"))
        keep[0, ids] = 0
        return scores + keep
    return process


def bad_words(words: list[list[int]], prompt_len: int):
    def process(seq, scores):
        out, scores = seq[prompt_len:], scores.clone()
        for w in words:
            if len(w) == 1 or out[-(len(w) - 1):] == w[:-1]:
                scores[0, w[-1]] = float("-inf")
        return scores
    return process


def test_each_field_matches_its_oracle_in_one_mixed_batch(tiny_lora_set, tiny_prompt_set, plain_tokenizer):
    base_dir, hf, loras = tiny_lora_set
    prompts_dir = tiny_prompt_set[2]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=128, block_size=4,
                                    max_model_len=128),
                       tokenizer=plain_tokenizer)
    adapters = {"lora": loras["rslora_all7"], "dora": loras["dora"], "prompt": prompts_dir["prompt_tuning"],
                "prefix": prompts_dir["ptuning_v2"]}
    for name, path in adapters.items():
        engine.load_adapter(name, str(path))
    g = torch.Generator().manual_seed(3)
    prompt = [torch.randint(3, 512, (5 + i,), generator=g).tolist() for i in range(12)]
    for i in (1, 3):  # prompts whose plain greedy output repeats a token, so that the penalties bite
        while len(set(out := forward_greedy(hf, prompt[i], N))) == len(out):
            prompt[i] = torch.randint(3, 512, (5 + i,), generator=g).tolist()
    plain_first = forward_greedy(hf, prompt[10], 2)
    cases = [  # adapter, sampling fields, the oracle's processing (None: plain greedy)
        (None, {}, None),
        (None, dict(presence_penalty=1.5, frequency_penalty=0.5), presence_frequency(len(prompt[1]), 1.5, 0.5)),
        ("lora", dict(repetition_penalty=1.5), repetition(1.5)),
        (None, dict(frequency_penalty=2.0), presence_frequency(len(prompt[3]), 0.0, 2.0)),
        ("prompt", dict(logit_bias={5: 8.0, 7: -100.0}), bias({5: 8.0, 7: -100.0})),
        ("dora", dict(min_tokens=4, logit_bias={EOS: 60.0}), min_tokens_with_bias(len(prompt[5]), 4, {EOS: 60.0})),
        ("prefix", {}, None),
        (None, dict(repetition_penalty=0.7), repetition(0.7)),
        ("prefix", dict(presence_penalty=-2.0), presence_frequency(len(prompt[8]), -2.0, 0.0)),
        (None, dict(allowed_token_ids=list(range(10, 30))), allowed(list(range(10, 30)))),
        (None, dict(bad_words_ids=[[plain_first[0]], [plain_first[0], plain_first[1]]]),
         bad_words([[plain_first[0]], [plain_first[0], plain_first[1]]], len(prompt[10]))),
        ("lora", {}, None),
    ]
    seqs = [engine.add_request(prompt[i], SamplingParams(max_tokens=N, temperature=0, **fields), adapter=name)
            for i, (name, fields, _) in enumerate(cases)]
    while engine.has_work():
        engine.step()
    for i, ((name, fields, process), seq) in enumerate(zip(cases, seqs)):
        if name is None:
            want = forward_greedy(hf, prompt[i], N, EOS, process)
        else:
            want = peft_greedy(hf, adapters[name], prompt[i], N, EOS, process)
        assert seq.output_ids == want, f"row {i} ({name or 'base'}, {fields})"
    assert seqs[5].output_ids[4:] == [EOS] and EOS not in seqs[5].output_ids[:4]  # min_tokens held EOS back
    plain = forward_greedy(hf, prompt[0], N)
    for i in (1, 3, 7, 9, 10):  # each field really changed the output
        assert seqs[i].output_ids != forward_greedy(hf, prompt[i], N, EOS), f"row {i} is unchanged"
    assert seqs[0].output_ids == plain


def test_min_p_keeps_only_tokens_near_the_top(tiny_models, plain_tokenizer):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4,
                                    max_model_len=128),
                       tokenizer=plain_tokenizer)
    seen = capture_logits(engine)
    seqs = [engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=24, temperature=1.5, min_p=mp, seed=s,
                                                            ignore_eos=True))
            for s, mp in enumerate([0.3, 0.3, 0.0, 0.6])]
    while engine.has_work():
        engine.step()
    for seq in seqs:
        for step, token in enumerate(seq.output_ids):
            probs = (seen[step][seq.request_id] / 1.5).softmax(-1)
            assert probs[token] >= seq.params.min_p * probs.max() - 1e-7
    # the filter bites: without it the same seed draws a token min_p would have dropped at some step
    free = [(seen[s][seqs[2].request_id] / 1.5).softmax(-1) for s in range(24)]
    assert any(p[t] < 0.3 * p.max() for p, t in zip(free, seqs[2].output_ids))


def test_seeded_rows_with_every_field_ignore_their_neighbours(tiny_lora_set, plain_tokenizer):
    base_dir, _, loras = tiny_lora_set

    def run(crowd: bool) -> list[int]:
        engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=128, block_size=4,
                                        max_model_len=128),
                           tokenizer=plain_tokenizer)
        engine.load_adapter("lora", str(loras["lora_qv"]))
        params = SamplingParams(max_tokens=12, temperature=0.9, seed=11, presence_penalty=0.8, repetition_penalty=1.2,
                                logit_bias={9: 3.0}, min_p=0.05, min_tokens=3, bad_words_ids=[[4, 5]])
        seq = engine.add_request([3, 4, 5, 6], params, adapter="lora")
        if crowd:
            for i in range(5):
                engine.add_request([7 + i] * (3 + i), SamplingParams(max_tokens=9, temperature=1.0, seed=i,
                                                                     frequency_penalty=1.0),
                                   adapter="lora" if i % 2 else None)
        while engine.has_work():
            engine.step()
        return seq.output_ids

    assert run(crowd=False) == run(crowd=True)


def test_bad_fields_are_refused_by_name():
    import pytest

    from quiver.server.engine.sampling import InvalidParam

    for fields, name in [(dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
                         (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                         (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(logit_bias={3: 101}), "logit_bias"),
                         (dict(logit_bias={600: 1}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
                         (dict(allowed_token_ids=[512]), "allowed_token_ids")]:
        with pytest.raises(InvalidParam) as info:
            SamplingParams(**fields).validate(512)
        assert info.value.param == name


def test_request_fields_reach_sampling_params_through_one_table():
    """Every field FROM_REQUEST names is a field of both APIs' requests and of SamplingParams, and arrives as
    the request gives it; one the request leaves None keeps SamplingParams' default; the computed ones are
    the preparer's."""
    import dataclasses

    from quiver.server.engine.sampling import FROM_REQUEST
    from quiver.server.http.protocol import ChatCompletionRequest, CompletionRequest

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    for model in (CompletionRequest, ChatCompletionRequest):
        assert set(FROM_REQUEST) <= set(model.model_fields) & fields, model
    given = dict(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, stop_token_ids=[5, 6], include_stop_str_in_output=True,
                 ignore_eos=True, min_tokens=2, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.5,
                 allowed_token_ids=[3, 4], skip_special_tokens=False)
    assert set(given) == set(FROM_REQUEST)
    req = CompletionRequest(prompt="x", stop="!", seed=3, **given)
    params = SamplingParams.from_request(req, max_tokens=9, stop=req.stop, seed=req.seed + 1)
    assert {name: getattr(params, name) for name in FROM_REQUEST} == given
    assert (params.max_tokens, params.stop, params.seed) == (9, ["!"], 4)
    plain = SamplingParams.from_request(CompletionRequest(prompt="x"))
    assert (plain.stop_token_ids, plain.allowed_token_ids, plain.top_k) == ([], None, 0)
