"""Automatic prefix caching: a request whose tokens start with cached blocks skips their prefill and
produces what it would have without the cache; blocks are keyed by the adapter's weights, so another
adapter, or the same name reloaded with new weights, reuses nothing; soft prompts and prefixes are
never cached; under memory pressure cached blocks are evicted, never lost. Keys are SHA-256: a block
whose key collided under the old built-in hash() is not handed out; cache_salt (and the tenant) keep
requests apart, and cached_tokens counts only what the request's own salt hit."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from helpers import all_blocks_free

from quiver.server.engine import block_manager
from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.sequence import Sequence
from quiver.server.http.prepare import salted

PREFIX = torch.randint(3, 512, (41,), generator=torch.Generator().manual_seed(0)).tolist()


def engine_for(base_dir, tokenizer, caching=True, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), block_size=4, enable_prefix_caching=caching,
                                  **{"num_kv_blocks": 128, "max_model_len": 128, **kw}), tokenizer=tokenizer)


def run(engine, prompt, adapter=None, n=6, salt=None):
    """One request alone, to the end: (output ids, prompt tokens taken from the cache)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    seq = engine.add(replace(engine.prepare(prompt, params, adapter), cache_salt=salt))
    while engine.has_work():
        engine.step()
    return seq.output_ids, seq.num_cached_tokens


def test_shared_prefix_is_reused_per_adapter_and_changes_nothing(tiny_lora_set, plain_tokenizer):
    base_dir, _, paths = tiny_lora_set
    on, off = engine_for(base_dir, plain_tokenizer), engine_for(base_dir, plain_tokenizer, caching=False)
    for e in (on, off):
        e.load_adapter("lora", str(paths["rslora_all7"]))
        e.load_adapter("dora", str(paths["dora"]))
    metrics = Metrics()
    plan = [  # adapter, suffix, prompt tokens expected from the cache
        (None, [7, 8, 9], 0), (None, [10, 11], 40), ("lora", [7, 8, 9], 0), ("lora", [12], 40),
        ("dora", [7, 8, 9], 0), (None, [], 40), ("dora", [13, 14, 15, 16, 17], 40)]
    for adapter, suffix, cached in plan:
        prompt = PREFIX + suffix
        got, hit = run(on, prompt, adapter)
        assert (got, hit) == (run(off, prompt, adapter)[0], cached), (adapter, suffix)
    # the output itself enters the cache: a prompt that continues a finished request reuses its blocks
    first, _ = run(on, PREFIX + [7, 8, 9])
    assert run(on, PREFIX + [7, 8, 9] + first + [5])[1] == (len(PREFIX) + 3 + len(first)) // 4 * 4
    assert all_blocks_free(on) and on.stats().kv_blocks_cached > 0
    assert off.stats().kv_blocks_cached == 0
    seq = on.add_request(PREFIX, SamplingParams(max_tokens=2, temperature=0), adapter="lora")
    while on.has_work():
        metrics.observe_step(on.stats(), on.step())
    assert seq.num_cached_tokens == 40
    assert metrics.prefix_hits.labels("lora")._value.get() == 40
    assert metrics.prefix_queries.labels("lora")._value.get() == len(PREFIX)


def test_an_adapter_reloaded_with_new_weights_reuses_nothing(tiny_lora_set, plain_tokenizer, tmp_path):
    base_dir, _, paths = tiny_lora_set
    on, off = engine_for(base_dir, plain_tokenizer), engine_for(base_dir, plain_tokenizer, caching=False)
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(paths["lora_qv"], old)
    shutil.copytree(paths["lora_r16_ko"], new)
    on.load_adapter("a", str(old))
    assert run(on, PREFIX + [1], "a")[1] == 0
    assert run(on, PREFIX + [2], "a")[1] == 40
    on.unload_adapter("a")
    on.load_adapter("a", str(new))  # the same name, other weights
    off.load_adapter("a", str(new))
    assert run(on, PREFIX + [2], "a") == (run(off, PREFIX + [2], "a")[0], 0)
    on.load_adapter("same-weights", str(old))  # another name, the first weights: their blocks are still valid
    off.load_adapter("same-weights", str(old))
    assert run(on, PREFIX + [3], "same-weights") == (run(off, PREFIX + [3], "same-weights")[0], 40)


def test_the_fingerprint_is_of_the_bytes_read_not_of_the_folder_after(tiny_lora_set, plain_tokenizer, tmp_path,
                                                                      monkeypatch):
    """A folder updated in place right after its weights were read: the adapter's KV stays keyed by the
    weights it was read with, never by the new ones."""
    base_dir, _, paths = tiny_lora_set
    engine = engine_for(base_dir, plain_tokenizer)
    live = tmp_path / "live"
    shutil.copytree(paths["lora_qv"], live)
    old = engine.read_adapter("old", str(paths["lora_qv"])).result().fingerprint
    new = engine.read_adapter("new", str(paths["lora_r16_ko"])).result().fingerprint
    assert old and new and old != new
    family = engine.loader.by_kind["lora"]
    read = family.read

    def read_then_update(name, path):
        adapter = read(name, path)
        shutil.copytree(paths["lora_r16_ko"], live, dirs_exist_ok=True)  # the update lands now
        return adapter

    monkeypatch.setattr(family, "read", read_then_update)
    assert engine.read_adapter("live", str(live)).result().fingerprint == old


def test_soft_prompts_and_prefixes_are_not_cached(tiny_prompt_set, plain_tokenizer):
    base_dir, _, paths = tiny_prompt_set
    on, off = engine_for(base_dir, plain_tokenizer), engine_for(base_dir, plain_tokenizer, caching=False)
    for name in ("prompt_tuning", "ptuning_v2"):
        for e in (on, off):
            e.load_adapter(name, str(paths[name]))
        for suffix in ([1], [2]):
            assert run(on, PREFIX + suffix, name) == (run(off, PREFIX + suffix, name)[0], 0)
    assert run(on, PREFIX + [3])[1] == 0 and run(on, PREFIX + [4])[1] == 40  # the base still caches


def test_cached_blocks_are_evicted_when_memory_runs_short(tiny_lora_set, plain_tokenizer):
    base_dir, _, _ = tiny_lora_set
    on = engine_for(base_dir, plain_tokenizer, num_kv_blocks=40)
    off = engine_for(base_dir, plain_tokenizer, caching=False, num_kv_blocks=40)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (60,), generator=g).tolist() for _ in range(6)]
    for p in prompts:  # each holds 17 of the 40 blocks while it runs: earlier prompts' blocks are evicted
        assert run(on, p)[0] == run(off, p)[0]
    assert run(on, prompts[0])[1] == 0  # long gone
    assert run(on, prompts[-1])[1] == 56  # still there
    outs = [on.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    while on.has_work():
        assert all(o.error is None for o in on.step())
    assert [s.output_ids for s in outs] == [run(off, p, n=8)[0] for p in prompts]
    assert all_blocks_free(on)


def test_usage_reports_the_cached_prompt_tokens(tiny_server):
    import httpx

    body = {"model": "tiny", "prompt": "the same long instructions " * 12, "max_tokens": 3, "temperature": 0}
    first, second = (httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60).json() for _ in range(2))
    prompt = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": (prompt - 1) // 4 * 4}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


# ---- keys no client can forge or probe ----------------------------------------------------------------
M64, P1, P2, P5 = 2**64, 11400714785074694791, 14029467366897019727, 2870177450012600261  # CPython's tuplehash


def tuple_state(lanes: list[int]) -> int:
    """CPython's tuplehash (Objects/tupleobject.c, 64-bit) before its length is added: xxHash's round per item."""
    acc = P5
    for lane in lanes:
        acc = (acc + lane * P2) % M64
        acc = ((acc << 31) | (acc >> 33)) % M64
        acc = acc * P1 % M64
    return acc


def forge(tokens: list[int]) -> list[int]:
    """Another block of tokens whose tuple hashes as `tokens`' does: change the first token, then solve the
    last round for the lane that brings the state back (hash(i) == i for |i| < 2**61 - 1, i != -1)."""
    for first in range(tokens[0] + 1, tokens[0] + 64):
        head = [first] + tokens[1:-1]
        lane = (tokens[-1] + (tuple_state(tokens[:-1]) - tuple_state(head)) * pow(P2, -1, M64)) % M64
        lane -= M64 if lane >= 2**63 else 0
        if abs(lane) < 2**61 - 1 and lane != -1:
            return head + [lane]
    raise AssertionError("no lane in range")


def old_block_hash(previous, key, tokens):
    return hash((previous, key, tuple(tokens)))


def plant(blocks: BlockManager, tokens: list[int], salt=None) -> None:
    """A request computes `tokens` and leaves: its full blocks stay in the prefix cache."""
    seq = Sequence("planter", list(tokens), SamplingParams(max_tokens=1), seed=0, cache_salt=salt)
    blocks.grow(seq, len(tokens))
    seq.num_computed = len(tokens)
    blocks.commit(seq)
    blocks.free(seq)


def cached_for(blocks: BlockManager, tokens: list[int], salt=None) -> int:
    seq = Sequence("victim", list(tokens), SamplingParams(max_tokens=1), seed=0, cache_salt=salt)
    got = blocks.match(seq)
    blocks.free(seq)
    return got


@pytest.mark.parametrize("victim", [[17, 291, 4, 88], [1, 2, 3, 4]])
def test_a_block_colliding_under_the_old_hash_is_not_handed_out(victim, monkeypatch):
    forged = forge(victim)
    assert forged != victim and tuple_state(victim) == tuple_state(forged)
    assert hash(tuple(forged)) == hash(tuple(victim))  # a real collision, in the interpreter's own hash()
    assert old_block_hash(None, "", forged) == old_block_hash(None, "", victim)  # the old key of a first block
    with monkeypatch.context() as m:  # the old scheme hands the planted block to the victim's prompt
        m.setattr(block_manager, "block_hash", old_block_hash)
        old = BlockManager(16, 4, caching=True)
        plant(old, forged + [5])
        assert cached_for(old, victim + [5]) == 4
    new = BlockManager(16, 4, caching=True)
    plant(new, forged + [5])
    assert cached_for(new, victim + [5]) == 0
    plant(new, victim + [5])
    assert cached_for(new, victim + [5]) == 4  # the victim's own prefix still hits


def test_block_keys_cover_parent_adapter_salt_and_tokens():
    root, kv = block_manager.ROOT, block_manager.fields("kv", "")
    h = block_manager.block_hash(root, kv, [1, 2, 3, 4])
    assert len(h) == 32 and h == block_manager.block_hash(root, kv, [1, 2, 3, 4])
    others = [block_manager.block_hash(h, kv, [1, 2, 3, 4]), block_manager.block_hash(root, kv, [1, 2, 3, 5]),
              block_manager.block_hash(root, block_manager.fields("kv", "fp"), [1, 2, 3, 4]),
              block_manager.block_hash(root, block_manager.fields("kv", "", "salt", "s"), [1, 2, 3, 4]),
              block_manager.block_hash(root, kv, [1, 2, 3, 4 + 2**32])]
    assert len({h, *others}) == 6
    assert block_manager.fields("ab", "c") != block_manager.fields("a", "bc")


def test_salts_keep_requests_apart(tiny_lora_set, plain_tokenizer):
    base_dir, _, _ = tiny_lora_set
    on, off = engine_for(base_dir, plain_tokenizer), engine_for(base_dir, plain_tokenizer, caching=False)
    plan = [("a", [1], 0), ("b", [2], 0), ("a", [3], 40), (None, [4], 0), ("b", [5], 40), (None, [6], 40)]
    for salt, suffix, cached in plan:
        got, hit = run(on, PREFIX + suffix, salt=salt)
        assert (got, hit) == (run(off, PREFIX + suffix)[0], cached), (salt, suffix)
    assert all_blocks_free(on)


def test_salted_keeps_tenants_apart_and_no_client_salt_spells_a_tenant():
    assert salted(None, None) is None and salted("t1", None, "global") is None
    assert salted("t1", "x", "global") == salted(None, "x") == salted("t2", "x", "global")
    tenants = {salted("t1", None), salted("t2", None), salted("t1", "x"), salted(None, "x")}
    assert len(tenants) == 4
    assert salted(None, salted("t1", None)) != salted("t1", None)  # a client cannot name another tenant's salt


def test_cached_tokens_never_exceed_the_prompt_after_a_preemption(tiny_lora_set, plain_tokenizer):
    base_dir, _, _ = tiny_lora_set
    # the second is preempted with 26 tokens (6 full blocks, kept in the cache) and re-admitted onto them
    engine = engine_for(base_dir, plain_tokenizer, num_kv_blocks=13, max_model_len=48)
    first = engine.add_request(PREFIX[:4], SamplingParams(max_tokens=23, temperature=0, ignore_eos=True))
    second = engine.add_request(PREFIX[4:9], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    cached = []
    while engine.has_work():
        engine.step()
        cached.append(second.num_cached_tokens)
    assert engine.num_preemptions >= 1 and second.num_preemptions >= 1
    assert max(cached) == second.num_prompt_tokens  # its whole prompt was cached, and nothing more counts
    assert first.num_cached_tokens == 0 and all_blocks_free(engine)


def test_usage_counts_only_the_same_salts_hits(tiny_server):
    import httpx

    body = {"model": "tiny", "prompt": "salted instructions, kept apart " * 8, "max_tokens": 2, "temperature": 0}

    def cached(**extra):
        r = httpx.post(tiny_server.url + "/v1/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(cache_salt="alice") == 0
    assert cached(cache_salt="bob") == 0 and cached() == 0
    assert cached(cache_salt="alice") > 0 and cached(cache_salt="bob") > 0
    r = httpx.post(tiny_server.url + "/v1/completions", json={**body, "cache_salt": ""}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
