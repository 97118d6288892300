"""Adapters loaded, used, listed and unloaded while the server runs; hostile inputs refused."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import httpx
import pytest
import torch
from bottleneck_ref import SEQ_BN, make_bottleneck
from helpers import LiveServer
from peft_fixtures import lora_variants, make_adapter, make_prompt_adapter, peft_greedy, prompt_variants

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine

PROMPT = [101, 2020, 333, 47, 5005]


@pytest.fixture(scope="module")
def hot(api_model, tokenizer, tmp_path_factory):
    base_dir, hf = api_model
    root = tmp_path_factory.mktemp("adapter_root")
    variants, prompts = lora_variants(hf.config.num_hidden_layers), prompt_variants()
    make_adapter(hf, root / "lora_qv", variants["lora_qv"], seed=900, scale=0.3)
    make_adapter(hf, root / "dora", variants["dora"], seed=901, scale=0.3)
    make_adapter(hf, root / "big_rank", variants["lora_r16_ko"], seed=902)
    make_prompt_adapter(hf, root / "ptuning_v2", prompts["ptuning_v2"], seed=903)
    make_bottleneck(hf, root / "bottleneck", "bottleneck", SEQ_BN, seed=904)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=256, block_size=4,
                                    max_model_len=128,
                                    served_model_name="tiny", max_loras=2, max_lora_rank=8), tokenizer=tokenizer)
    from quiver.server.engine.metrics import Metrics
    with LiveServer(AsyncEngine(engine, Metrics()), adapter_root=root) as server:
        yield server, hf, root


def post(server, path, body, timeout=60):
    return httpx.post(server.url + path, json=body, timeout=timeout)


def complete(server, model, max_tokens=6):
    return post(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True})


def names(server):
    return [a["name"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]]


def test_load_use_list_and_unload_every_family(hot, tokenizer):
    server, hf, root = hot
    engine = server.engine
    free0 = engine.stats().kv_blocks_free
    for name in ("lora_qv", "dora", "ptuning_v2", "bottleneck"):
        r = post(server, "/v1/adapters", {"name": name, "path": name})
        assert r.status_code == 200, r.text
    info = {a["name"]: a for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
    assert info["lora_qv"]["family"] == "lora" and info["lora_qv"]["rank"] == 4
    assert info["lora_qv"]["target_modules"] == ["q_proj", "v_proj"] and info["lora_qv"]["bytes"] > 0
    assert info["ptuning_v2"]["virtual_tokens"] == 7 and info["bottleneck"]["family"] == "bottleneck"
    for name in ("lora_qv", "dora", "ptuning_v2"):
        text = complete(server, name).json()["choices"][0]["text"]
        assert text == tokenizer.decode(peft_greedy(hf, root / name, PROMPT, 6), skip_special_tokens=True), name
    assert complete(server, "bottleneck").status_code == 200
    info = {a["name"]: a for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
    assert info["lora_qv"]["requests_served"] == 1
    assert engine.stats().kv_blocks_free == free0 - 2  # the prefix's two blocks
    for name in ("lora_qv", "dora", "ptuning_v2", "bottleneck"):
        assert httpx.delete(server.url + f"/v1/adapters/{name}").status_code == 200
        r = complete(server, name)
        assert r.status_code == 404, name
    assert names(server) == [] and engine.stats().kv_blocks_free == free0
    stats = engine.stats()
    assert stats.lora_slots_free == 2 and stats.adapters_resident["device"] == 0  # slots given back


def test_vllm_aliases(hot):
    server, _, _ = hot
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "lora_qv"})
    assert r.status_code == 200 and "sql" in r.text
    assert complete(server, "sql").status_code == 200
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert r.status_code == 200 and "sql" not in names(server)


def _copy(root, src, dst):
    if (root / dst).exists():
        shutil.rmtree(root / dst)
    shutil.copytree(root / src, root / dst)
    return root / dst


def _retensor(path, fn, file="adapter_model.safetensors"):
    from safetensors.torch import load_file, save_file
    save_file(fn(load_file(str(path / file))), str(path / file))


def _hostile_cases(root, outside):
    (root / "escape").unlink(missing_ok=True)
    os.symlink(outside, root / "escape")
    pickle = _copy(root, "lora_qv", "pickle_only")
    (pickle / "adapter_model.safetensors").rename(pickle / "adapter_model.bin")
    truncated = _copy(root, "lora_qv", "truncated")
    (truncated / "adapter_model.safetensors").write_bytes((truncated / "adapter_model.safetensors").read_bytes()[:64])
    shapes = _copy(root, "lora_qv", "wrong_shapes")
    _retensor(shapes, lambda t: {k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in t.items()})
    nan = _copy(root, "lora_qv", "nan_weights")
    _retensor(nan, lambda t: {k: v * float("nan") for k, v in t.items()})
    unknown = _copy(root, "lora_qv", "unknown_type")
    cfg = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "VERA"}))
    arch = _copy(root, "bottleneck", "other_arch")
    meta = json.loads((arch / "adapter_config.json").read_text())
    (arch / "adapter_config.json").write_text(json.dumps({**meta, "model_type": "gpt2"}))
    return [
        ({"name": "a", "path": "../outside"}, 400, "path"),
        ({"name": "a", "path": str(outside)}, 400, "path"),
        ({"name": "a", "path": "escape"}, 400, "path"),
        ({"name": "a", "path": "does_not_exist"}, 404, "path"),
        ({"name": "a", "path": "pickle_only"}, 422, "pickle"),
        ({"name": "a", "path": "truncated"}, 422, "cannot be read"),
        ({"name": "a", "path": "wrong_shapes"}, 422, "do not match"),
        ({"name": "a", "path": "big_rank"}, 422, "max-lora-rank"),
        ({"name": "a", "path": "nan_weights"}, 422, "NaN"),
        ({"name": "a", "path": "unknown_type"}, 422, "peft_type"),
        ({"name": "a", "path": "other_arch"}, 422, "model_type"),
        ({"name": "x" * 200, "path": "lora_qv"}, 400, "name"),
        ({"name": "naïve-λ", "path": "lora_qv"}, 400, "name"),
        ({"name": "../etc", "path": "lora_qv"}, 400, "name"),
    ]


def test_hostile_inputs_are_refused_and_change_nothing(hot, tmp_path):
    server, _, root = hot
    outside = tmp_path / "outside_adapter"
    shutil.copytree(root / "lora_qv", outside)
    before = names(server)
    for body, status, needle in _hostile_cases(root, outside):
        r = post(server, "/v1/adapters", body)
        err = r.json()["error"]
        assert r.status_code == status, (body, r.text)
        assert needle in err["message"] or err["param"] == needle, (body, err)
        assert names(server) == before
        assert complete(server, "tiny", 2).status_code == 200  # still serving


def test_a_path_outside_the_root_names_the_root_and_the_flag(hot, tmp_path):
    """The 400 shows the absolute root (whatever paths other errors hide) and the flag that widens it."""
    server, _, root = hot
    for path in (str(tmp_path), "../elsewhere"):
        r = post(server, "/v1/adapters", {"name": "far", "path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
        assert r.json()["error"]["message"] == (
            f"adapter path {path!r} resolves outside the adapter root {str(root.resolve())!r} (start the server "
            "with --adapter-root DIR to allow loading from DIR)")


def test_concurrent_load_of_one_name(hot):
    server, _, _ = hot

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/adapters", json={"name": "twin", "path": p})
                                          for p in ("lora_qv", "dora")])

    codes = sorted(r.status_code for r in asyncio.run(both()))
    assert codes == [200, 409]
    assert names(server).count("twin") == 1
    assert httpx.delete(server.url + "/v1/adapters/twin").status_code == 200


def test_unload_in_use_is_409_until_requests_finish(hot):
    server, _, _ = hot
    assert post(server, "/v1/adapters", {"name": "busy", "path": "lora_qv"}).status_code == 200
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "busy", "prompt": PROMPT, "max_tokens": 60, "stream": True,
                            "ignore_eos": True}) as stream:
        lines = stream.iter_lines()
        next(lines)
        r = httpx.delete(server.url + "/v1/adapters/busy")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
    assert httpx.delete(server.url + "/v1/adapters/busy").status_code == 200


def test_hot_load_does_not_stall_running_streams(hot, tokenizer):
    """16 streams over 4 adapters decode while a fifth adapter is read and registered; the
    largest gap between chunks stays within a generous bound of the usual gap."""
    server, hf, root = hot
    running = {"run_lora": "lora_qv", "run_prefix": "ptuning_v2", "run_bottleneck": "bottleneck",
               "run_lora_b": "lora_qv"}
    for name, path in running.items():
        assert post(server, "/v1/adapters", {"name": name, "path": path}).status_code == 200

    async def stream(client, model, gaps):
        last = None
        async with client.stream("POST", "/v1/completions", json={
                "model": model, "prompt": PROMPT, "max_tokens": 40, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now
                    assert "error" not in json.loads(line[6:])

    async def run():
        gaps: list = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            tasks = [asyncio.create_task(stream(c, list(running)[i % 4], gaps)) for i in range(16)]
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            r = await c.post("/v1/adapters", json={"name": "newcomer", "path": "dora"})
            t1 = time.monotonic()
            new = await c.post("/v1/completions", json={"model": "newcomer", "prompt": PROMPT, "max_tokens": 6,
                                                        "temperature": 0, "ignore_eos": True})
            await asyncio.gather(*tasks)
        return gaps, (t0, t1), r, new

    gaps, (t0, t1), loaded, new = asyncio.run(run())
    assert loaded.status_code == 200
    want = tokenizer.decode(peft_greedy(hf, root / "dora", PROMPT, 6), skip_special_tokens=True)
    assert new.json()["choices"][0]["text"] == want
    usual = sorted(g for _, g in gaps)[len(gaps) // 2]
    during = [g for at, g in gaps if t0 <= at <= t1 + usual * 2]
    assert max(during, default=0) <= 5 * usual + 1.0, (max(during), usual)
    for name in [*running, "newcomer"]:
        assert httpx.delete(server.url + f"/v1/adapters/{name}").status_code == 200


def test_adapter_metrics(hot):
    server, _, _ = hot
    assert post(server, "/v1/adapters", {"name": "m1", "path": "lora_qv"}).status_code == 200
    assert complete(server, "m1").status_code == 200
    assert 'quiver_generation_tokens_total{adapter="m1"} 6.0' in httpx.get(server.url + "/metrics").text
    assert httpx.delete(server.url + "/v1/adapters/m1").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert 'quiver_adapter_loads_total{family="lora"}' in text
    assert 'quiver_adapter_unloads_total{family="lora"}' in text
    assert 'quiver_adapter_load_seconds_count{family="lora"}' in text
    assert 'adapter="m1"' not in text  # an unloaded adapter's series are dropped
    assert "quiver_adapters_resident" in text


@pytest.mark.slow
def test_unload_and_reload_100_times_keeps_memory_flat(smollm2_dir, tokenizer, tmp_path):
    """A SmolLM2 LoRA of r=16 on all seven projections (~19.5 MB) loaded, used and unloaded 100
    times: the process's RSS grows by less than one adapter."""
    import ctypes
    import gc

    import psutil
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from quiver.server.engine.sampling import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    make_adapter(hf, tmp_path / "big", LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), seed=950, scale=0.01)
    del hf
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(smollm2_dir), max_model_len=128, num_kv_blocks=32,
                                    max_loras=2),
                       tokenizer=tokenizer)
    proc = psutil.Process()

    def cycle():
        engine.load_adapter("big", str(tmp_path / "big"))
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=1), adapter="big")
        while engine.has_work():
            engine.step()
        engine.unload_adapter("big")

    def settled_rss() -> int:
        """RSS once freed memory is back with the OS: glibc keeps freed heap pages (per-thread arenas of the
        loader's worker threads) until trimmed, which moves RSS by more than an adapter on a busy machine."""
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return proc.memory_info().rss

    for _ in range(5):  # warm-up: slot buffers, allocator pools
        cycle()
    gc.collect()
    modules = engine.read_adapter("big", str(tmp_path / "big")).result().adapter.adapter.modules.values()
    size = sum(t.numel() * t.element_size() for m in modules for t in (m.a, m.b))
    before = settled_rss()
    for _ in range(100):
        cycle()
    grown = settled_rss() - before
    assert grown < size, f"RSS grew {grown / 2**20:.1f} MiB over 100 cycles; one adapter is {size / 2**20:.1f} MiB"
    assert engine.adapter_names() == [] and engine.stats().lora_slots_free == engine.config.max_loras


def test_tiers_round_robin_six_adapters_over_two_slots_and_three_in_memory(api_model, tokenizer, tmp_path):
    """--adapter-dir with 6 LoRA adapters (none read at start), --max-loras 2, --max-cpu-loras 3:
    concurrent round-robin requests all succeed with PEFT's outputs while adapters move between
    disk, host memory and device slots."""
    from quiver.server.engine.metrics import Metrics

    base_dir, hf = api_model
    variants = lora_variants(hf.config.num_hidden_layers)
    kinds = ["lora_qv", "rslora_all7", "dora", "adalora", "lora_r1_mlp", "dora_mlp"]
    for i, kind in enumerate(kinds):
        make_adapter(hf, tmp_path / f"a{i}", variants[kind], seed=970 + i, scale=0.3)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=256, block_size=4,
                                    max_model_len=128,
                                    served_model_name="tiny", max_loras=2, max_cpu_loras=3), tokenizer=tokenizer)
    assert engine.add_adapter_dir(str(tmp_path)) == [f"a{i}" for i in range(6)]
    assert engine.adapter_names() == []  # nothing read yet
    metrics = Metrics()
    with LiveServer(AsyncEngine(engine, metrics), adapter_root=tmp_path) as server:
        tiers = {a["name"]: a["tier"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
        assert set(tiers.values()) == {"disk"}

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "model": f"a{i % 6}", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
                    for i in range(18)])

        results = asyncio.run(run())
        assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
        for i, r in enumerate(results):
            want = tokenizer.decode(peft_greedy(hf, tmp_path / f"a{i % 6}", PROMPT, 5), skip_special_tokens=True)
            assert r.json()["choices"][0]["text"] == want, i
        tiers = engine.stats().adapters_resident
        assert tiers["device"] + tiers["cpu"] <= 3 and tiers["device"] <= 2
        text = httpx.get(server.url + "/metrics").text
        assert 'quiver_adapter_evictions_total{tier="device"}' in text
        assert 'quiver_adapter_evictions_total{tier="cpu"}' in text
        evictions = engine.stats().adapter_evictions
        assert evictions["cpu"] > 0 and evictions["device"] > 0
        tiers = {a["name"]: a["tier"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
        assert sorted(tiers) == [f"a{i}" for i in range(6)] and "disk" in tiers.values()
