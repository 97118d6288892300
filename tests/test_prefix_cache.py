"""Automatic prefix caching: a request whose tokens start with cached blocks skips their prefill and
produces what it would have without the cache; blocks are keyed by the adapter's weights, so another
adapter, or the same name reloaded with new weights, reuses nothing; soft prompts and prefixes are
never cached; under memory pressure cached blocks are evicted, never lost."""
from __future__ import annotations

import shutil

import torch
from helpers import all_blocks_free

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.engine.sampling import SamplingParams

PREFIX = torch.randint(3, 512, (41,), generator=torch.Generator().manual_seed(0)).tolist()


def engine_for(base_dir, tokenizer, caching=True, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), block_size=4, max_model_len=128,
                                  enable_prefix_caching=caching,
                                  **{"num_kv_blocks": 128, **kw}), tokenizer=tokenizer)


def run(engine, prompt, adapter=None, n=6):
    """One request alone, to the end: (output ids, prompt tokens taken from the cache)."""
    seq = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter=adapter)
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
