"""n > 1: the choices share the prompt's full KV blocks (computed once) and give what the same requests
give alone."""
from __future__ import annotations

import pytest
from helpers import all_blocks_free

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

BS = 4


def make_engine(base_dir, tokenizer, adapters=()):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=160, block_size=BS,
                                    max_model_len=128),
                       tokenizer=tokenizer)
    for name, path in adapters:
        engine.load_adapter(name, str(path))
    return engine


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=10, temperature=1.0, seed=seed, ignore_eos=True, presence_penalty=0.5)


@pytest.mark.parametrize("adapter", [None, "ptuning_v2", "prompt_tuning", "dora"])
def test_choices_share_the_prompt_blocks_and_match_lone_requests(tiny_lora_set, tiny_prompt_set, plain_tokenizer,
                                                                  adapter):
    base_dir, _, loras = tiny_lora_set
    paths = {**loras, **tiny_prompt_set[2]}
    adapters = [(adapter, paths[adapter])] if adapter else []
    prompt = list(range(10, 40))  # 30 tokens
    engine = make_engine(base_dir, plain_tokenizer, adapters)
    seqs = [engine.add_request(prompt, params(7 + j), adapter, request_id=f"c{j}", fork_of="c0" if j else None)
            for j in range(4)]
    engine.step()  # the first choice prefills; the others wait for it
    leader = seqs[0]
    assert [s.num_computed for s in seqs[1:]] == [(len(prompt) + leader.num_virtual - 1) // BS * BS] * 3
    full = (leader.num_virtual + len(prompt) - 1) // BS
    shared = leader.block_table[len(leader.shared_blocks):len(leader.shared_blocks) + full]
    assert all(engine.blocks.refcount(b) == 4 for b in shared)
    for s in seqs[1:]:
        assert s.block_table[:len(s.shared_blocks) + full] == leader.block_table[:len(s.shared_blocks) + full]
    engine.step()  # the others compute only the rest of the prompt
    stats = engine.stats()
    in_use = stats.kv_blocks - stats.kv_blocks_free - stats.kv_blocks_adapters
    alone = -(-(leader.num_virtual + len(prompt) + 1) // BS)  # what one choice holds after its first token
    assert in_use < 4 * alone and in_use == full + 4 * (alone - full)
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert stats.kv_blocks_free + stats.kv_blocks_adapters == stats.kv_blocks

    lone = make_engine(base_dir, plain_tokenizer, adapters)
    for j in range(4):
        want = lone.add_request(prompt, params(7 + j), adapter)
        while lone.has_work():
            lone.step()
        assert seqs[j].output_ids == want.output_ids, f"choice {j}"
    assert len({tuple(s.output_ids) for s in seqs}) > 1  # different seeds, different choices


def test_a_leader_that_goes_first_lets_its_forks_compute_alone(tiny_models, plain_tokenizer):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = make_engine(base_dir, plain_tokenizer)
    prompt = list(range(10, 40))
    leader = engine.add_request(prompt, params(1), request_id="a")
    forks = [engine.add_request(prompt, params(2 + j), request_id=f"b{j}", fork_of="a") for j in range(2)]
    engine.abort("a")
    assert all(f.fork_from is None for f in forks)
    while engine.has_work():
        engine.step()
    assert leader.finish_reason == "abort" and all(len(f.output_ids) == 10 for f in forks)
    assert all_blocks_free(engine)


def test_a_leader_that_finishes_in_its_prefill_step_still_shares(tiny_models, plain_tokenizer):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = make_engine(base_dir, plain_tokenizer)
    prompt = list(range(10, 40))
    one = SamplingParams(max_tokens=1, temperature=0)
    engine.add_request(prompt, one, request_id="a")
    fork = engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0), request_id="b", fork_of="a")
    engine.step()  # "a" prefills, samples its one token and finishes; "b" keeps the blocks it shares
    assert fork.num_computed == 28 and all(engine.blocks.refcount(b) == 1 for b in fork.block_table)
    while engine.has_work():
        engine.step()
    lone = make_engine(base_dir, plain_tokenizer)
    want = lone.add_request(prompt, SamplingParams(max_tokens=3, temperature=0))
    while lone.has_work():
        lone.step()
    assert fork.output_ids == want.output_ids
