"""LoRA adapters through the HTTP API: routing, listing, and greedy output equal to PEFT's."""
from __future__ import annotations

import httpx
import openai
import pytest
from helpers import LiveServer
import torch
from peft_fixtures import lora_variants, make_adapter, peft_greedy

from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine

NAMES = ("lora_qv", "rslora_all7", "dora", "adalora")


@pytest.fixture(scope="module")
def lora_server(api_model, tokenizer, tmp_path_factory):
    base_dir, hf = api_model
    root = tmp_path_factory.mktemp("api_loras")
    variants = lora_variants(hf.config.num_hidden_layers)
    paths = {}
    for i, name in enumerate(NAMES):
        make_adapter(hf, root / name, variants[name], seed=300 + i, scale=0.3)
        paths[name] = root / name
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=128, block_size=4,
                                    max_model_len=128,
                                    served_model_name="tiny", max_loras=4), tokenizer=tokenizer)
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    with LiveServer(AsyncEngine(engine)) as server:
        yield server, hf, paths


def test_models_lists_adapters_with_parent(lora_server):
    server, _, paths = lora_server
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert data[0]["id"] == "tiny" and data[0]["parent"] is None
    assert {m["id"]: m["parent"] for m in data[1:]} == {name: "tiny" for name in paths}


def test_model_retrieve_is_the_listed_card_or_404(lora_server):
    server, _, _ = lora_server
    listed = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    for name in ("tiny", "dora"):
        card = httpx.get(server.url + f"/v1/models/{name}").json()
        assert card == {**listed[name], "created": card["created"]}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("lora_qv").parent == "tiny"
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": f"model 'nope' does not exist; available: tiny, {', '.join(NAMES)}", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_greedy_over_http_matches_peft(lora_server, tokenizer):
    server, hf, paths = lora_server
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompt = [101, 2020, 333, 47, 5005, 606]

    async def run():
        import asyncio
        calls = [client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                           extra_body={"adapter": name, "ignore_eos": True}) for name in NAMES]
        # the same adapters named through `model`, as vLLM routes them, and one base request
        calls += [client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True}) for name in NAMES]
        calls.append(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True}))
        return await asyncio.gather(*calls)

    import asyncio
    results = asyncio.run(run())
    texts = [r.choices[0].text for r in results]
    for i, name in enumerate(NAMES):
        want = tokenizer.decode(peft_greedy(hf, paths[name], prompt, 10), skip_special_tokens=True)
        assert texts[i] == want, name
        assert texts[len(NAMES) + i] == want, name
    assert texts[-1] not in texts[:len(NAMES)]  # the adapters really change the output


def test_an_unknown_model_lists_at_most_twenty_names(lora_server):
    server, _, paths = lora_server
    many = [f"extra{i:02d}" for i in range(20)]
    for name in many:
        server.engine.know_adapter(name, str(paths["dora"]))  # known, read on first use
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"})
        shown = ["tiny", *NAMES, *many][:20]
        assert r.status_code == 404 and r.json()["error"]["message"] == \
            f"model 'nope' does not exist; available: {', '.join(shown)} and 5 more (GET /v1/models lists them all)"
    finally:
        for name in many:
            server.engine.catalog.forget(name)


def test_unknown_adapter_is_404_and_server_keeps_serving(lora_server):
    server, _, _ = lora_server
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "adapter": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "adapter": "dora", "max_tokens": 2})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def prompt_server(api_model, tokenizer, tmp_path_factory):
    """Every prompt family, two LoRA adapters and a bottleneck adapter on one server."""
    from bottleneck_ref import SEQ_BN, make_bottleneck
    from peft_fixtures import make_prompt_adapter, prompt_variants

    base_dir, hf = api_model
    root = tmp_path_factory.mktemp("api_prompts")
    paths = {}
    for i, (name, cfg) in enumerate(prompt_variants().items()):
        make_prompt_adapter(hf, root / name, cfg, seed=700 + i)
        paths[name] = root / name
    variants = lora_variants(hf.config.num_hidden_layers)
    for i, name in enumerate(("lora_qv", "dora")):
        make_adapter(hf, root / name, variants[name], seed=750 + i, scale=0.3)
        paths[name] = root / name
    make_bottleneck(hf, root / "bottleneck", "bottleneck", SEQ_BN, seed=760)
    paths["bottleneck"] = root / "bottleneck"
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=128, block_size=4,
                                    max_model_len=64,
                                    served_model_name="tiny"), tokenizer=tokenizer)
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    with LiveServer(AsyncEngine(engine)) as server:
        yield server, hf, paths


def test_every_family_over_http_matches_peft(prompt_server, tokenizer):
    """All families and a base request at once: each PEFT adapter's greedy text equals PEFT's."""
    import asyncio

    server, hf, paths = prompt_server
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompt = [101, 2020, 333, 47, 5005]
    names = [*paths, "tiny"]

    async def run():
        return await asyncio.gather(*[client.completions.create(
            model=name, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            for name in names])

    results = dict(zip(names, asyncio.run(run())))
    base = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert results["tiny"].choices[0].text == tokenizer.decode(base, skip_special_tokens=True)
    for name, path in paths.items():
        if name == "bottleneck":  # checked against its reference module in test_bottleneck.py
            continue
        r = results[name]
        want = peft_greedy(hf, path, prompt, 8)
        assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), name
        assert r.usage.prompt_tokens == len(prompt)  # virtual tokens are not prompt tokens


def test_prompt_family_over_context_is_a_clear_400(prompt_server):
    server, _, _ = prompt_server
    body = {"prompt": [5] * 30, "max_tokens": 30, "adapter": "ptuning_v2"}  # 30 + 30 fits 64, + 7 does not
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400 and "virtual tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/completions", json={**body, "adapter": None})
    assert r.status_code == 200



def test_model_retrieve_takes_a_name_with_a_slash(api_model, tokenizer, tmp_path):
    from fastapi.testclient import TestClient

    from quiver.server.http.app import create_app

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=16, max_model_len=64,
                                    served_model_name="org/base"), tokenizer=tokenizer)
    client = TestClient(create_app(AsyncEngine(engine), adapter_root=tmp_path))
    assert client.get("/v1/models/org/base").json()["id"] == "org/base"
    assert client.get("/v1/models/org").status_code == 404
