"""Prompt tuning, P-tuning (MLP, LSTM), prefix tuning and P-tuning v2 against HF PEFT, mixed in
one batch with base rows and LoRA rows."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import FP32_ATOL_30_LAYERS, check_mixed_batch, run_staggered
from peft_fixtures import make_prompt_adapter, peft_greedy, peft_logits, prompt_variants

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import InvalidParam, SamplingParams


def engine_for(model_dir, tokenizer, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=str(model_dir), **{"dtype": "float32", **kw}), tokenizer=tokenizer)


def test_every_family_matches_peft_in_one_mixed_batch(tiny_prompt_set, tiny_lora_set, tokenizer):
    base_dir, hf, prompt_paths = tiny_prompt_set
    _, _, lora_paths = tiny_lora_set
    paths = {**prompt_paths, "dora": lora_paths["dora"], "rslora_all7": lora_paths["rslora_all7"]}
    engine = engine_for(base_dir, tokenizer)
    check_mixed_batch(engine, hf, paths, hf.config.vocab_size)
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks - stats.kv_blocks_adapters


@pytest.mark.slow
def test_every_family_matches_peft_on_smollm2(smollm2_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    paths = {}
    for i, (name, cfg) in enumerate(prompt_variants().items()):
        # std 0.2 prompt weights: at 0.5, a random 7-token prefix in all 30 layers already puts
        # PEFT's own fp32 logits 2e-4 from a float64 run (ours 1.6e-4), beyond any 1e-4 comparison
        make_prompt_adapter(hf, tmp_path / name, cfg, seed=600 + i, scale=0.2)
        paths[name] = tmp_path / name
    from peft_fixtures import lora_variants, make_adapter
    for i, name in enumerate(("lora_qv", "rslora_all7")):  # LoRA rows in the same batch
        make_adapter(hf, tmp_path / name, lora_variants(hf.config.num_hidden_layers)[name], seed=650 + i, scale=0.05)
        paths[name] = tmp_path / name
    engine = engine_for(smollm2_dir, tokenizer, block_size=16, num_kv_blocks=64, max_model_len=256)
    check_mixed_batch(engine, hf, paths, hf.config.vocab_size, atol=FP32_ATOL_30_LAYERS, fp64_arbiter=True)


def test_requests_share_one_copy_of_a_prefix(tiny_prompt_set, tokenizer):
    base_dir, _, paths = tiny_prompt_set
    engine = engine_for(base_dir, tokenizer, num_kv_blocks=64)
    free0 = engine.stats().kv_blocks_free
    engine.load_adapter("v2", str(paths["ptuning_v2"]))  # 7 virtual tokens: 2 blocks of 4
    prefix = engine.residency.by_kind["prefix"].prefix_blocks["v2"]  # which blocks: the family's own record
    assert len(prefix) == 2 and engine.stats().kv_blocks_free == free0 - 2
    a = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), adapter="v2")
    b = engine.add_request([8, 9, 10, 11, 12], SamplingParams(max_tokens=3, temperature=0), adapter="v2")
    engine.step()
    assert a.block_table[:2] == list(prefix) and b.block_table[:2] == list(prefix)
    assert all(engine.blocks.refcount(blk) == 3 for blk in prefix)  # the adapter and two requests
    own = len(a.block_table) - 2 + len(b.block_table) - 2
    assert engine.stats().kv_blocks_free == free0 - 2 - own  # the prefix was not copied per request
    while engine.has_work():
        engine.step()
    assert all(engine.blocks.refcount(blk) == 1 for blk in prefix)
    assert engine.stats().kv_blocks_free == free0 - 2


def test_virtual_tokens_count_toward_context_not_usage(tiny_prompt_set, tokenizer):
    base_dir, _, paths = tiny_prompt_set
    engine = engine_for(base_dir, tokenizer, max_model_len=20, num_kv_blocks=16)
    engine.load_adapter("pt", str(paths["prompt_tuning"]))  # 5 virtual tokens
    engine.load_adapter("v2", str(paths["ptuning_v2"]))  # 7
    engine.add_request([5] * 10, SamplingParams(max_tokens=10))  # fits without virtual tokens
    for name in ("pt", "v2"):
        with pytest.raises(InvalidParam, match="virtual tokens"):
            engine.add_request([5] * 10, SamplingParams(max_tokens=10), adapter=name)
    seq = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), adapter="pt")
    while engine.has_work():
        engine.step()
    assert seq.num_prompt_tokens == 3 and seq.num_output_tokens == 4 and len(seq.output_ids) == 4


def test_prompt_logprobs_with_a_soft_prompt_match_peft(tiny_prompt_set, tokenizer):
    base_dir, hf, paths = tiny_prompt_set
    engine = engine_for(base_dir, tokenizer)
    engine.load_adapter("pt", str(paths["prompt_tuning"]))
    prompt = [11, 22, 33, 44, 55, 66]
    seq = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), adapter="pt")
    while engine.has_work():
        engine.step()
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    ref = torch.log_softmax(peft_logits(hf, paths["prompt_tuning"], prompt), dim=-1)
    for j in range(1, len(prompt)):
        assert abs(seq.prompt_logprobs[j].logprob - ref[j - 1, prompt[j]].item()) <= 1e-4


def test_preempted_prompt_rows_still_match_peft(tiny_prompt_set, tokenizer):
    base_dir, hf, paths = tiny_prompt_set
    names = list(paths)
    engine = engine_for(base_dir, tokenizer, num_kv_blocks=24, max_model_len=48, max_num_batched_tokens=16)
    for name in names:
        engine.load_adapter(name, str(paths[name]))
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 512, (4 + 3 * i,), generator=g).tolist() for i in range(len(names))]
    adapters = dict(enumerate(names))
    add = engine.add_request
    engine.add_request = lambda p, params, request_id=None: add(p, params, adapter=adapters[int(request_id[1:])],
                                                                request_id=request_id)
    got = run_staggered(engine, [(i, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
                                 for i, p in enumerate(prompts)])
    assert engine.num_preemptions >= 1
    for i, name in enumerate(names):
        assert got[f"r{i}"] == peft_greedy(hf, paths[name], prompts[i], 12), name


def test_mixed_batch_through_the_triton_attention_kernel(tiny_prompt_set, tokenizer):
    """The engine with the Triton kernels (interpreted on CPU) instead of the torch ops: prefix
    rows, soft-prompt rows and base rows still equal PEFT."""
    base_dir, hf, paths = tiny_prompt_set
    engine = engine_for(base_dir, tokenizer, kernels="triton")
    assert engine.kernels == "triton"
    check_mixed_batch(engine, hf, {k: paths[k] for k in ("prompt_tuning", "prefix_projection", "ptuning_v2")},
                      hf.config.vocab_size)


def test_an_adapter_still_on_disk_counts_its_virtual_tokens(tiny_prompt_set, tokenizer, tmp_path):
    """Before its first read, the length check and the default max_tokens already count the adapter's
    virtual tokens (read from its config): a prefix adapter's request never runs past the context."""
    base_dir, _, paths = tiny_prompt_set
    for name in ("prompt_tuning", "ptuning_v2"):  # 5 and 7 virtual tokens
        shutil.copytree(paths[name], tmp_path / name)
    engine = engine_for(base_dir, tokenizer, max_model_len=20, num_kv_blocks=16)
    engine.add_adapter_dir(str(tmp_path))
    assert engine.virtual_tokens("prompt_tuning") == 5 and engine.virtual_tokens("ptuning_v2") == 7
    for name in ("prompt_tuning", "ptuning_v2"):
        with pytest.raises(InvalidParam, match="virtual tokens"):
            engine.add_request([5] * 10, SamplingParams(max_tokens=10), adapter=name)
    seq = engine.add_request([5] * 10, SamplingParams(max_tokens=3, temperature=0), adapter="ptuning_v2")
    while engine.num_waiting() or engine.has_work():  # parked until a worker thread has read it
        engine.step()
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3
    assert engine.residency.is_resident("ptuning_v2") and engine.virtual_tokens("ptuning_v2") == 7


def test_decode_steps_from_lists_equal_the_general_build(tiny_prompt_set, tokenizer, monkeypatch):
    """engine.step.decode_step (a decode-only step's Step from a few lists) against rows_step (the general
    build) on the same rows: base rows, soft prompts and prefix caches (kv offsets, prefix lengths), block
    tables of different lengths, rows joining and leaving."""
    import quiver.server.engine.llm_engine as llm_engine
    from quiver.server.engine import step as step_module

    base_dir, _, paths = tiny_prompt_set
    engine = engine_for(base_dir, tokenizer)
    for name in ("prompt_tuning", "ptuning_v2", "prefix_projection"):
        engine.load_adapter(name, str(paths[name]))
    compared = []

    def build(rows, *args):
        step = step_module.build_step(rows, *args)
        if all(n == 1 for _, n in rows) and all(s.num_computed + 1 == s.num_tokens for s, _ in rows):
            general = step_module.rows_step(step.rows, *args)
            for name in ("input_ids", "positions", "slot_mapping", "logits_index", "sample_index", "fresh_blocks"):
                assert torch.equal(getattr(step, name), getattr(general, name)), name
            for name in ("starts", "lens", "offsets", "kv_offsets", "prefix_lens", "block_tables"):
                assert torch.equal(getattr(step.layout, name), getattr(general.layout, name)), name
            assert step.layout.num_tokens == general.layout.num_tokens and step.sampled == general.sampled
            assert step.prompt_logprob_spans == general.prompt_logprob_spans == []
            compared.append(len(rows))
        return step

    monkeypatch.setattr(llm_engine, "build_step", build)
    adapters = [None, "prompt_tuning", "ptuning_v2", "prefix_projection", None]
    arrivals = [(at, list(range(5, 9 + 3 * i)), SamplingParams(max_tokens=6 + 2 * i, temperature=0, ignore_eos=True))
                for i, at in enumerate((0, 0, 2, 3, 5))]
    add = engine.add_request
    engine.add_request = lambda p, params, request_id: add(p, params, adapter=adapters[int(request_id[1:])],
                                                           request_id=request_id)
    run_staggered(engine, arrivals)
    assert len(compared) >= 5 and max(compared) >= 3
