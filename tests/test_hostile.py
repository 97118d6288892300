"""Hostile requests and files against a live server: each gets a clean answer, a neighbour's request
running at the same time gets its usual output, /health keeps answering within a second, memory
stays bounded, and nothing is left held (KV blocks, adapter pins)."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import threading
import time

import httpx
import psutil
import pytest
import torch
from helpers import LiveServer, make_tiny_model
from peft_fixtures import lora_variants, make_adapter, make_prompt_adapter, prompt_variants
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import OTHER, Metrics

NEIGHBOUR = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
RSS_BOUND = 1.5 * 2**30


@pytest.fixture(scope="module")
def hostile(tokenizer, tmp_path_factory):
    """A tiny model with SmolLM2's vocabulary and an 8k context, served with default limits."""
    root = tmp_path_factory.mktemp("hostile")
    hf = make_tiny_model(root / "model", "llama_gqa", vocab_size=49152, max_positions=16384)
    adapters = root / "adapters"
    adapters.mkdir()
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(root / "model"), num_kv_blocks=2048, block_size=16,
                                    max_model_len=8192,
                                    served_model_name="tiny", max_loras=2), tokenizer=tokenizer)
    with LiveServer(AsyncEngine(engine, Metrics()), adapter_root=adapters) as server:
        server.hf, server.adapters = hf, adapters
        server.usual = httpx.post(server.url + "/v1/completions", json=NEIGHBOUR, timeout=60).json()["choices"][0]["text"]
        server.idle_rss = psutil.Process().memory_info().rss
        yield server


def run_case(server, send) -> tuple[httpx.Response | Exception, float]:
    """send(client) -> the hostile response, while a neighbour's request runs and /health is polled;
    returns the hostile answer and the slowest /health answer."""
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            slowest = [0.0]
            done = asyncio.Event()

            async def poll():
                while not done.is_set():
                    t0 = time.monotonic()
                    r = await client.get("/health")
                    assert r.status_code == 200, r.text
                    slowest[0] = max(slowest[0], time.monotonic() - t0)
                    await asyncio.sleep(0.1)

            poller = asyncio.create_task(poll())
            neighbour = asyncio.create_task(client.post("/v1/completions", json=NEIGHBOUR))
            try:
                answer = await send(client)
            except httpx.HTTPError as exc:
                answer = exc
            n = await neighbour
            done.set()
            await poller
            return answer, n, slowest[0]

    answer, neighbour, slowest = asyncio.run(main())
    assert neighbour.status_code == 200 and neighbour.json()["choices"][0]["text"] == server.usual
    assert psutil.Process().memory_info().rss - server.idle_rss < RSS_BOUND
    engine = server.engine
    deadline = time.monotonic() + 30
    while (engine.seqs or engine.has_work()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert not engine.seqs and not stats.adapters_in_use  # nothing held once idle
    assert stats.kv_blocks_free == stats.kv_blocks - stats.kv_blocks_adapters
    return answer, slowest


def error_of(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()["error"]
    assert body["message"] and not re.search(r"(?:^|[\s'\"(])/[\w.-]", body["message"]), body  # no paths
    if param != "any":
        assert body["param"] == param, body
    return body


def test_many_prompts_with_one_long_one_is_served_in_bounded_memory(hostile):
    """One 8000-token prompt next to 63 short ones: today's padding would allocate rows x chunk x context."""
    body = {"prompt": [[100] * 8000] + [[1, 2]] * 63, "max_tokens": 1, "temperature": 0}
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json=body))
    assert r.status_code == 200 and len(r.json()["choices"]) == 64
    assert slowest < 1.0


def test_a_40_mb_prompt_is_refused_before_it_is_read(hostile):
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", content=json.dumps(
        {"prompt": "a " * 20_000_000, "max_tokens": 1}), headers={"content-type": "application/json"}))
    assert error_of(r, 413)["code"] == "request_too_large"
    assert slowest < 1.0


def test_thirty_thousand_prompts_or_thousands_of_stops_are_refused(hostile):
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json={
        "prompt": [[1]] * 30000, "stop": ["a"] * 3000, "max_tokens": 1}))
    assert error_of(r, 400)["param"] in ("prompt", "stop")
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"prompt": "x", "stop": ["a"] * 3000}))
    error_of(r, 400, "stop")
    assert slowest < 1.0


def test_a_huge_model_name_is_refused_without_being_echoed(hostile):
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"model": "m" * 200_000, "prompt": "x"}))
    assert len(r.content) < 2000 and error_of(r, 400, "model")
    r = httpx.delete(hostile.url + "/v1/adapters/" + "m" * 5000)
    assert len(r.content) < 2000 and r.status_code == 404


def test_models_and_adapters_show_no_server_paths(hostile):
    make_adapter(hostile.hf, hostile.adapters / "listed", lora_variants(2)["lora_qv"], seed=1)
    assert httpx.post(hostile.url + "/v1/adapters", json={"name": "listed", "path": "listed"}).status_code == 200
    for route in ("/v1/models", "/v1/adapters"):
        text = httpx.get(hostile.url + route).text
        assert str(hostile.adapters) not in text and "/tmp" not in text and '"path"' not in text, text
    listed = {a["name"]: a for a in httpx.get(hostile.url + "/v1/adapters").json()["data"]}
    assert listed["listed"]["source"] == "listed"
    r = httpx.post(hostile.url + "/v1/adapters", json={"name": "nope", "path": "no-such-folder"})
    error_of(r, 404)
    assert httpx.delete(hostile.url + "/v1/adapters/listed").status_code == 200


def _lora_files(hostile, name: str, edit_config=None, edit_tensors=None):
    path = hostile.adapters / name
    make_adapter(hostile.hf, path, lora_variants(2)["lora_qv"], seed=3)
    if edit_config:
        cfg = json.loads((path / "adapter_config.json").read_text())
        edit_config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file(edit_tensors(tensors), str(path / "adapter_model.safetensors"))
    return name


@pytest.mark.parametrize("case,needle", [
    ("rank0", "rank"), ("alpha_nan", "lora_alpha"), ("alpha_huge", "lora_alpha"),
    ("untargeted", "target_modules"), ("rank_pattern", "rank"),
])
def test_bad_lora_checkpoints_are_refused_by_name(hostile, case, needle):
    edits = {
        "rank0": dict(edit_config=lambda c: c.update(r=0),
                      edit_tensors=lambda t: {k: (v[:0] if "lora_A" in k else v[:, :0]) for k, v in t.items()}),
        "alpha_nan": dict(edit_config=lambda c: c.update(lora_alpha=math.nan)),
        "alpha_huge": dict(edit_config=lambda c: c.update(lora_alpha=1e39)),
        "untargeted": dict(edit_config=lambda c: c.update(target_modules=["k_proj"])),
        "rank_pattern": dict(edit_config=lambda c: c.update(rank_pattern={"q_proj": 2})),
    }
    name = _lora_files(hostile, f"bad_{case}", **edits[case])
    r, _ = run_case(hostile, lambda c: c.post("/v1/adapters", json={"name": name, "path": name}))
    assert needle in error_of(r, 422)["message"]
    assert name not in [a["id"] for a in httpx.get(hostile.url + "/v1/models").json()["data"]]


def test_an_adapter_whose_virtual_tokens_leave_no_room_is_refused_before_it_is_read(hostile):
    """A prompt-tuning adapter in the adapter folder whose virtual tokens leave no room in the context: its
    config's num_virtual_tokens counts before its weights are read, so every request is the same 400 and the
    adapter is never read (nor marked failed)."""
    path = hostile.adapters / "too_long"
    make_prompt_adapter(hostile.hf, path, prompt_variants()["prompt_tuning"], seed=4)
    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    n = 8192  # = max_model_len
    save_file({"prompt_embeddings": tensors["prompt_embeddings"][:1].repeat(n, 1)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": n}))
    hostile.engine.add_adapter_dir(str(hostile.adapters))
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"model": "too_long", "prompt": "x"}))
    first = error_of(r, 400, "max_tokens")
    assert "8192 virtual tokens" in first["message"]
    r = httpx.post(hostile.url + "/v1/completions", json={"model": "too_long", "prompt": "x"}, timeout=30)
    assert error_of(r, 400, "max_tokens") == first
    listed = {a["name"]: a for a in httpx.get(hostile.url + "/v1/adapters").json()["data"]}
    assert listed.get("too_long", {}).get("tier") != "failed", listed.get("too_long")
    assert "too_long" not in hostile.engine.adapter_names()  # never read


def test_chat_without_max_tokens_leaves_room_for_virtual_tokens(hostile):
    path = hostile.adapters / "soft"
    make_prompt_adapter(hostile.hf, path, prompt_variants()["prompt_tuning"], seed=5)
    assert httpx.post(hostile.url + "/v1/adapters", json={"name": "soft", "path": "soft"}).status_code == 200
    r, _ = run_case(hostile, lambda c: c.post("/v1/chat/completions", json={
        "model": "soft", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stop_token_ids": [5]}))
    assert r.status_code == 200, r.text
    assert httpx.delete(hostile.url + "/v1/adapters/soft").status_code == 200


def test_an_adapter_with_overflowing_weights_fails_only_its_own_requests(hostile):
    """Finite weights whose products overflow: non-finite logits for that adapter's rows alone."""
    name = _lora_files(hostile, "overflow", edit_tensors=lambda t: {k: torch.full_like(v, 1e30) for k, v in t.items()})
    assert httpx.post(hostile.url + "/v1/adapters", json={"name": name, "path": name}).status_code == 200
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 3}))
    assert error_of(r, 500)["code"] == "non_finite_logits"
    assert httpx.get(hostile.url + "/health").status_code == 200
    assert httpx.delete(hostile.url + f"/v1/adapters/{name}").status_code == 200


def test_a_failing_forward_pass_fails_only_the_request_that_causes_it(hostile):
    """An observer that raises whenever one marked request is in the step: the step is retried
    without it, the neighbour gets its usual tokens, the marked request alone fails."""
    def poison(step, _):
        if any(len(seq.prompt_ids) == 13 for seq, _ in step.rows):
            raise RuntimeError("injected failure")

    hostile.engine.observers.append(poison)
    try:
        r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"prompt": [7] * 13, "max_tokens": 2}))
    finally:
        hostile.engine.observers.remove(poison)
    body = error_of(r, 500)
    assert body["code"] == "step_failed" and "injected failure" in body["message"]
    assert httpx.get(hostile.url + "/health").status_code == 200


def test_nan_in_free_kv_blocks_never_reaches_a_request(hostile):
    engine = hostile.engine
    used = {b for seq in engine.seqs.values() for b in seq.block_table}
    free = [b for b in range(engine.blocks.num_blocks) if b not in used and engine.blocks.refcount(b) == 0]
    for k, v in engine.runner.kv_caches:
        k[:, free] = float("nan")
        v[:, free] = float("inf")
    r = httpx.post(hostile.url + "/v1/completions", json=NEIGHBOUR, timeout=60)
    assert r.json()["choices"][0]["text"] == hostile.usual


def test_the_base_model_answers_as_before_after_everything(hostile):
    r = httpx.post(hostile.url + "/v1/completions", json=NEIGHBOUR, timeout=60)
    assert r.json()["choices"][0]["text"] == hostile.usual


def test_names_known_in_any_tier_cannot_be_rebound_and_parked_adapters_cannot_be_unloaded(hostile):
    make_adapter(hostile.hf, hostile.adapters / "on_disk", lora_variants(2)["lora_qv"], seed=6)
    make_adapter(hostile.hf, hostile.adapters / "other", lora_variants(2)["lora_r16_ko"], seed=7)
    hostile.engine.add_adapter_dir(str(hostile.adapters))
    r = httpx.post(hostile.url + "/v1/adapters", json={"name": "on_disk", "path": "other"})
    assert error_of(r, 409, "name")["code"] == "adapter_exists"
    # a request parked on the adapter's first read holds it: unloading it meanwhile is a 409
    loader, seen = hostile.engine.loader, []  # the one function every adapter read goes through
    read = loader.read

    def slow_read(name, path):
        seen.append(httpx.delete(hostile.url + f"/v1/adapters/{name}").status_code)
        return read(name, path)

    loader.read = slow_read
    try:
        r = httpx.post(hostile.url + "/v1/completions", json={"model": "on_disk", "prompt": "x", "max_tokens": 2},
                       timeout=60)
    finally:
        del loader.read
    assert r.status_code == 200 and seen == [409]
    assert httpx.delete(hostile.url + "/v1/adapters/on_disk").status_code == 200


def test_a_request_that_cannot_fit_beside_the_prefixes_is_refused_not_stalled(tokenizer, tmp_path):
    """A cache of exactly one max-length sequence, part of it held by an adapter prefix: a request that
    needs the whole context is a 400 naming max_tokens up front, instead of preempting itself for ever."""
    from helpers import make_tiny_model

    from quiver.server.engine.sampling import InvalidParam, SamplingParams

    hf = make_tiny_model(tmp_path / "m", "llama_gqa")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path / "m"), num_kv_blocks=16, block_size=4,
                                    max_model_len=64),
                       tokenizer=tokenizer)
    make_prompt_adapter(hf, tmp_path / "v2", prompt_variants()["ptuning_v2"], seed=8)  # 7 tokens: 2 blocks
    engine.load_adapter("v2", str(tmp_path / "v2"))
    assert engine.stats().kv_blocks_adapters == 2
    with pytest.raises(InvalidParam, match="KV-cache blocks") as e:
        engine.add_request([5] * 44, SamplingParams(max_tokens=16), adapter=None)  # 60 tokens: 15 blocks > 16 - 2
    assert e.value.param == "max_tokens"
    seq = engine.add_request([5] * 20, SamplingParams(max_tokens=8, ignore_eos=True), adapter="v2")
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "length" and engine.stats().kv_blocks_free == 14


# ---- bounds on fields that would stall everyone (each a 400 naming the field) ------------------------
def _chat(content: str = "Hi", **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def test_a_vocabulary_sized_allowed_token_ids_or_40k_bad_words_are_refused(hostile):
    ids = json.dumps({"prompt": "x", "max_tokens": 1, "allowed_token_ids": [49151] * 1_300_000}, separators=(",", ":"))
    assert len(ids) < 8 << 20  # under the body limit: the field's own bound answers
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", content=ids,
                                                   headers={"content-type": "application/json"}))
    assert "vocabulary" in error_of(r, 400, "allowed_token_ids")["message"]
    assert slowest < 1.0
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 1, "bad_words": [f"w{i}" for i in range(40_000)]}))
    error_of(r, 400, "bad_words")
    assert slowest < 1.0


def test_repeated_allowed_token_ids_and_bad_words_count_once(hostile):
    """A list that repeats one id is that id's set (the output is that token); bad words repeated are one."""
    r = httpx.post(hostile.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 1,
                                                           "allowed_token_ids": [42, 42, 42] * 1000, "n": 2},
                   timeout=60).json()
    assert [c["text"] for c in r["choices"]] == [hostile.engine.tokenizer.decode([42] * 3)] * 2
    r = httpx.post(hostile.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1,
                                                           "bad_words": ["same"] * 1024}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_huge_schema_is_refused_and_identical_schemas_compile_once(hostile, monkeypatch):
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}
    r, slowest = run_case(hostile, lambda c: c.post("/v1/chat/completions", json=_chat(
        response_format={"type": "json_schema", "json_schema": {"name": "h", "schema": huge}})))
    assert "--max-grammar-chars" in error_of(r, 400, "response_format")["message"]
    assert slowest < 1.0
    grammars, compiles = hostile.engine.grammars, []
    compile_ = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda spec: compiles.append(spec) or compile_(spec))
    schema = {"type": "object", "properties": {f"k{i}_{time.monotonic_ns()}": {"type": "integer"} for i in range(50)}}
    body = _chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})

    async def two(c):
        return await asyncio.gather(c.post("/v1/chat/completions", json=body),
                                    c.post("/v1/chat/completions", json={**body, "messages": [
                                        {"role": "user", "content": "Other"}]}))

    (a, b), slowest = run_case(hostile, two)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert len(compiles) == 1 and slowest < 1.0
    # a refusal is kept too, and names the field of each request that sends the same text
    bad = {"type": "array", "uniqueItems": True}
    for field in ("guided_json", "guided_json", "response_format"):
        extra = {field: bad} if field == "guided_json" else {
            "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": bad}}}
        error_of(httpx.post(hostile.url + "/v1/chat/completions", json=_chat(**extra), timeout=60), 400, field)
    assert len(compiles) == 2


def test_a_client_template_cannot_reach_the_renderer(hostile):
    """Nested loops that never finish, by every way a request could bring its own template: each a 400."""
    loops = "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}"
    for fields, param in (({"chat_template": loops}, "chat_template"),
                          ({"chat_template_kwargs": {"chat_template": loops}}, "chat_template_kwargs"),
                          ({"chat_template_kwargs": {"documents": [{"text": loops}]}}, "chat_template_kwargs"),
                          ({"chat_template_kwargs": {"tools": [{"type": "function"}]}}, "chat_template_kwargs"),
                          ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")):
        r, slowest = run_case(hostile, lambda c: c.post("/v1/chat/completions", json=_chat(**fields)))
        error_of(r, 400, param)
        assert slowest < 1.0
    # a plain value the template does not read is dropped (as vLLM does), and one it reads is only data
    plain = httpx.post(hostile.url + "/v1/chat/completions", json=_chat(temperature=0), timeout=60).json()
    kw = httpx.post(hostile.url + "/v1/chat/completions", json=_chat(temperature=0, chat_template_kwargs={
        "unused": loops, "nested": {"a": [1, 2.5, None, True]}}), timeout=60).json()
    assert kw["choices"][0]["message"] == plain["choices"][0]["message"]


def test_preparation_counts_against_the_request_timeout(hostile, monkeypatch):
    """A chat template that takes longer than --request-timeout: the request gets the timeout's 504."""
    tok, release = hostile.engine.tokenizer, threading.Event()
    render = tok.apply_chat_template

    def slow(*args, **kwargs):
        release.wait(60)
        return render(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", slow)
    monkeypatch.setattr(hostile.async_engine, "request_timeout", 3.0)
    try:
        r, slowest = run_case(hostile, lambda c: c.post("/v1/chat/completions", json=_chat()))
    finally:
        release.set()
    assert error_of(r, 504)["code"] == "request_timeout"
    assert slowest < 1.0


# ---- probing another client's traffic, scans, scrapes, formatting, edge values ------------------------
def _cached(body):
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_cache_salt_learns_nothing_from_cached_tokens(hostile):
    """A client probing for a prefix someone else sent, under its own cache_salt, sees no hit."""
    body = {"prompt": "a shared system prompt, then the question " * 8, "max_tokens": 1}
    victim = [httpx.post(hostile.url + "/v1/completions", json={**body, "cache_salt": "victim"}, timeout=60).json()
              for _ in range(2)]
    assert _cached(victim[0]) == 0 and _cached(victim[1]) > 0
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json={**body, "cache_salt": "prober"}))
    assert r.status_code == 200 and _cached(r.json()) == 0, r.text
    assert slowest < 1.0


def test_a_burst_of_unknown_adapter_names_is_answered_at_once(hostile):
    async def send(c):
        answers = await asyncio.gather(*(c.post("/v1/completions", json={"model": f"nobody{i}", "prompt": "x"})
                                         for i in range(200)))
        return answers
    answers, slowest = run_case(hostile, send)
    assert {r.status_code for r in answers} == {404}
    assert all(error_of(r, 404, "model")["message"].startswith(f"model 'nobody{i}' does not exist")
               for i, r in enumerate(answers))
    assert slowest < 1.0


def test_metrics_scrapes_in_a_burst_keep_health_answering(hostile):
    async def send(c):
        return await asyncio.gather(*(c.get("/metrics") for _ in range(40)))
    answers, slowest = run_case(hostile, send)
    assert {r.status_code for r in answers} == {200} and "quiver" in answers[0].text
    assert slowest < 1.0


def test_echo_with_logprobs_of_a_long_prompt(hostile):
    prompt = list(range(100, 2100))
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 5, "temperature": 0}))
    assert r.status_code == 200, r.text[:300]
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
    assert slowest < 1.0


def test_a_vanishing_temperature_is_greedy_and_a_64_bit_seed_is_taken(hostile):
    greedy = httpx.post(hostile.url + "/v1/completions", json=NEIGHBOUR, timeout=60).json()["choices"][0]["text"]
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={**NEIGHBOUR, "temperature": 1e-40}))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, r.text
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 4, "temperature": 1.0, "seed": 2**63 - 1}))
    assert r.status_code == 200, r.text


def test_an_adapter_named_base_or_linking_out_of_its_folder_is_refused(hostile, tmp_path):
    _lora_files(hostile, "base")
    r, _ = run_case(hostile, lambda c: c.post("/v1/adapters", json={"name": "base", "path": "base"}))
    error_of(r, 400)
    _lora_files(hostile, "linked")
    outside = tmp_path / "weights.safetensors"
    (hostile.adapters / "linked" / "adapter_model.safetensors").rename(outside)
    (hostile.adapters / "linked" / "adapter_model.safetensors").symlink_to(outside)
    r, _ = run_case(hostile, lambda c: c.post("/v1/adapters", json={"name": "linked", "path": "linked"}))
    assert "links out of its adapter folder" in error_of(r, 400, "path")["message"]
    assert "linked" not in hostile.engine.adapter_names()


# ---- adapter dirs, metrics, files edited in place, grammars too complex ------------------------------
def test_a_big_adapter_dir_with_unreadable_entries_answers_every_request(hostile, monkeypatch, caplog):
    """3000 junk folders (empty, stray files, a config alone), one that cannot be listed, a file and a dangling
    link where folders are expected, in an adapter dir: unknown names are 404s and /v1/models lists none."""
    junk = hostile.adapters / "junk"
    junk.mkdir()
    real_listdir = os.listdir

    def listdir(path="."):  # root reads a chmod 000 folder: its refusal is simulated as test_discovery does
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    caplog.set_level(logging.WARNING, logger="quiver.server.families")
    try:
        for i in range(3000):
            (junk / f"j{i}").mkdir()
            if i % 3:
                (junk / f"j{i}" / ("adapter_config.json" if i % 3 == 1 else "notes.txt")).write_text("{}")
        (junk / "locked").mkdir(mode=0)
        (junk / "a_file").write_text("{}")
        (junk / "dangling").symlink_to(junk / "nowhere")
        names = [f"nobody{i}" for i in range(100)] + ["j1", "j2", "j3", "locked", "a_file", "dangling", "junk"]
        assert not set(hostile.engine.add_adapter_dir(str(junk))) & {*names, *(f"j{i}" for i in range(3000))}

        async def send(c):
            return await asyncio.gather(*(c.post("/v1/completions", json={"model": n, "prompt": "x"}) for n in names),
                                        *(c.get("/v1/models") for _ in range(20)))

        answers, slowest = run_case(hostile, send)
        for name, r in zip(names, answers):
            assert error_of(r, 404, "model")["message"].startswith(f"model '{name}' does not exist")
        for r in answers[len(names):]:
            assert r.status_code == 200, r.text[:300]
            assert not {m["id"] for m in r.json()["data"]} & {*names, *(f"j{i}" for i in range(3000))}
        assert any(r.getMessage().startswith(f"skipping {junk / 'locked'}") for r in caplog.records)
        assert slowest < 1.0
    finally:
        if (junk / "locked").exists():
            (junk / "locked").chmod(0o700)  # as any other user, for rmtree
        shutil.rmtree(junk)


def test_a_folder_still_being_copied_is_unknown_then_served(hostile, tmp_path):
    """Its config without its weights: the unknown name's 404 (never a 500 nor `failed`), then served once
    the copy completes."""
    make_adapter(hostile.hf, tmp_path / "src", lora_variants(2)["lora_qv"], seed=9)
    hostile.engine.add_adapter_dir(str(hostile.adapters))
    half = hostile.adapters / "half"
    half.mkdir()
    shutil.copy(tmp_path / "src" / "adapter_config.json", half)
    r, slowest = run_case(hostile, lambda c: c.post("/v1/completions", json={"model": "half", "prompt": "x"}))
    assert error_of(r, 404, "model")["message"].startswith("model 'half' does not exist")
    assert "half" not in {a["name"] for a in httpx.get(hostile.url + "/v1/adapters").json()["data"]}
    shutil.copy(tmp_path / "src" / "adapter_model.safetensors", half)
    r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={"model": "half", "prompt": "x",
                                                                         "max_tokens": 2}))
    assert r.status_code == 200, r.text[:300]
    assert slowest < 1.0


def _labels(text: str) -> set[str]:
    return {s.labels["adapter"] for f in text_string_to_metric_families(text) for s in f.samples
            if "adapter" in s.labels}


def test_metrics_label_at_most_the_cap_of_adapters_and_drop_unloaded_ones(hostile, monkeypatch):
    metrics = hostile.async_engine.metrics
    cap = len(metrics._labels) + 2  # two places left under the cap, whatever earlier cases labelled
    monkeypatch.setattr(metrics, "max_adapters", cap)
    names = [f"m{i}" for i in range(5)]
    for i, name in enumerate(names):
        make_adapter(hostile.hf, hostile.adapters / "cap" / name, lora_variants(2)["lora_qv"], seed=20 + i)
        assert httpx.post(hostile.url + "/v1/adapters", json={"name": name, "path": f"cap/{name}"}).status_code == 200

    async def send(c):
        return await asyncio.gather(*(c.post("/v1/completions", json={"model": n, "prompt": "x", "max_tokens": 2})
                                      for n in names))

    answers, slowest = run_case(hostile, send)
    assert {r.status_code for r in answers} == {200}
    labels = _labels(httpx.get(hostile.url + "/metrics").text)
    own = labels & set(names)
    assert len(own) == 2 and OTHER in labels and len(labels - {"base", OTHER}) <= cap, labels
    for name in names:
        assert httpx.delete(hostile.url + f"/v1/adapters/{name}").status_code == 200
    hostile.wait_idle()
    httpx.post(hostile.url + "/v1/completions", json=NEIGHBOUR, timeout=60)  # a step: the unloads are observed
    assert not _labels(httpx.get(hostile.url + "/metrics").text) & set(names)
    assert slowest < 1.0


def test_a_prefix_adapter_edited_in_place_is_served_with_its_new_weights_after_a_reload(hostile):
    """Its tensors rewritten on disk between two requests, then unloaded and loaded again: served (no 500),
    with the output of a fresh copy of the edited folder."""
    folder = hostile.adapters / "edits"
    make_prompt_adapter(hostile.hf, folder / "live", prompt_variants()["ptuning_v2"], seed=10)
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    def ask(name):
        r, _ = run_case(hostile, lambda c: c.post("/v1/completions", json={**body, "model": name}))
        assert r.status_code == 200, r.text[:300]
        return r.json()["choices"][0]["text"]

    assert httpx.post(hostile.url + "/v1/adapters", json={"name": "live", "path": "edits/live"}).status_code == 200
    before = ask("live")
    weights = folder / "live" / "adapter_model.safetensors"
    save_file({k: -3 * v for k, v in load_file(str(weights)).items()}, str(weights))
    assert httpx.delete(hostile.url + "/v1/adapters/live").status_code == 200
    assert httpx.post(hostile.url + "/v1/adapters", json={"name": "live", "path": "edits/live"}).status_code == 200
    shutil.copytree(folder / "live", folder / "copy")
    assert httpx.post(hostile.url + "/v1/adapters", json={"name": "copy", "path": "edits/copy"}).status_code == 200
    after = ask("live")
    assert after == ask("copy") and after != before, (before, after)
    for name in ("live", "copy"):
        assert httpx.delete(hostile.url + f"/v1/adapters/{name}").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_past_llguidances_complexity_limit_is_a_400_before_any_200(hostile, stream):
    """Under --max-grammar-chars, but six allOf'ed anyOfs of ten: llguidance's expansion limit refuses it at
    compile, so the answer is a 400 naming response_format, not a 200 whose first token then fails."""
    schema = {"allOf": [{"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "integer"}},
                                    "required": [f"p{i}_{j}"]} for j in range(10)]} for i in range(6)]}
    assert len(json.dumps(schema)) < 64 << 10
    body = _chat(stream=stream, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    r, slowest = run_case(hostile, lambda c: c.post("/v1/chat/completions", json=body))
    assert "schema too large" in error_of(r, 400, "response_format")["message"]
    assert slowest < 1.0
