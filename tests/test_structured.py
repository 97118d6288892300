"""Structured output and tools, through the live API on a tiny model with SmolLM2's vocabulary and an
adapter of every family: what comes back parses and validates, sampled at temperature 1."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from helpers import LiveServer

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "email": {"type": "string", "format": "email", "maxLength": 12}},
    "required": ["name", "age", "tags"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"]}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}


@pytest.fixture(scope="module")
def family_server(api_model, tokenizer, tmp_path_factory):
    from quiver.bench.load import build_adapters
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=2048, block_size=8,
                                    max_model_len=256,
                                    served_model_name="tiny"), tokenizer=tokenizer)
    families = build_adapters(engine, tmp_path_factory.mktemp("family_adapters"), rank=8, virtual=4)
    with LiveServer(AsyncEngine(engine, Metrics())) as server:
        server.adapters = [None] + sorted(families)  # base, lora0-2, prompt_tuning0, p_tuning0, prefix_tuning0-1, ...
        yield server


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=300)


def test_json_schema_outputs_validate_for_every_family(family_server):
    """Eight seeds (n=8) per adapter at temperature 1, every family in the same batches."""
    def ask(adapter):
        body = {"messages": [{"role": "user", "content": "Describe a person."}], "temperature": 1.0, "seed": 5,
                "n": 8, "max_tokens": 120,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
        if adapter:
            body["model"] = adapter
        return adapter, post(family_server, "/v1/chat/completions", body)

    with ThreadPoolExecutor(len(family_server.adapters)) as pool:
        answers = list(pool.map(ask, family_server.adapters))
    for adapter, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (adapter or "tiny")
        choices = r.json()["choices"]
        assert len(choices) == 8 and len({c["message"]["content"] for c in choices}) > 1
        for c in choices:
            assert c["finish_reason"] == "stop", (adapter, c)
            jsonschema.validate(json.loads(c["message"]["content"]), PERSON)


@pytest.mark.parametrize("field,value,check", [
    ("guided_regex", "[a-z]{3}-[0-9]{2}", lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
    ("guided_choice", ["yes", "no", "maybe so"], lambda t: t in ("yes", "no", "maybe so")),
    ("guided_grammar", 'root ::= "(" [0-9] [0-9]? ("+" [0-9] [0-9]?)? ")"',  # GBNF
     lambda t: re.fullmatch(r"\(\d\d?(\+\d\d?)?\)", t)),
    ("structured_outputs", {"grammar": 'start: "<" WORD ">"\nWORD: /[a-z]{1,4}/'},  # Lark
     lambda t: re.fullmatch("<[a-z]{1,4}>", t)),
    ("response_format", {"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
    ("structured_outputs", {"regex": "ab+c"}, lambda t: re.fullmatch("ab+c", t)),
    ("guided_json", json.dumps({"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}),
     lambda t: len(json.loads(t)) == 2 and all(isinstance(x, bool) for x in json.loads(t))),
])
def test_every_constraint_kind_on_completions(family_server, field, value, check):
    tok = family_server.engine.tokenizer
    # free JSON from a random model wanders: nudge it to close its strings and objects (the bias and the
    # grammar compose: the grammar still decides what may come)
    nudge = ({str(tok.convert_tokens_to_ids(t)): 12.0 for t in ('"', '""', '":', '"}', '}')}
             if field == "response_format" else {})
    for adapter in (None, "lora0", "prefix_tuning1", "bottleneck0"):
        body = {"prompt": "Answer:", "temperature": 1.0, "seed": 3, "n": 3, "max_tokens": 60, field: value,
                "logit_bias": nudge}
        if adapter:
            body["adapter"] = adapter
        r = post(family_server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert c["finish_reason"] == "stop" and check(c["text"]), (field, adapter, c)


def test_tool_choice_required_and_named_give_valid_calls(family_server):
    messages = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    for adapter in (None, "lora1", "p_tuning0"):
        r = post(family_server, "/v1/chat/completions", {
            "model": adapter or "tiny", "messages": messages, "tools": [WEATHER, ADD], "tool_choice": "required",
            "temperature": 1.0, "seed": 1, "n": 4, "max_tokens": 120, "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
            assert len(c["message"]["tool_calls"]) == 1
            for call in c["message"]["tool_calls"]:
                assert call["type"] == "function" and call["id"].startswith("call_")
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    r = post(family_server, "/v1/chat/completions", {
        "messages": messages, "tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}},
        "temperature": 1.0, "seed": 2, "n": 4, "max_tokens": 60, "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] == "add"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["add"])


def test_streamed_tool_call_deltas_add_up_to_the_whole_answer(family_server):
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER, ADD], "temperature": 1.0,
            "seed": 9, "max_tokens": 120, "tool_choice": "required", "parallel_tool_calls": False}
    whole = post(family_server, "/v1/chat/completions", body).json()["choices"][0]
    calls: dict[int, dict] = {}
    finish = None
    with httpx.stream("POST", family_server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            finish = choice["finish_reason"] or finish
            for d in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                if "id" in d:
                    call["id"] = d["id"]
                call["name"] += (d.get("function") or {}).get("name") or ""
                call["arguments"] += (d.get("function") or {}).get("arguments") or ""
    assert finish == "tool_calls"
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == want


def test_refusals_name_their_field(family_server):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    for body, param in [
        ({**chat, "tools": [WEATHER]}, "tool_choice"),  # auto: this template has no tool-call format
        ({**chat, "tool_choice": "required"}, "tool_choice"),  # no tools
        ({**chat, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({**chat, "tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "null"}}}}},
         "response_format"),
        ({**chat, "guided_json": {"type": "string", "format": "idn-email"}}, "guided_json"),
        ({**chat, "functions": []}, "functions"),
        ({**chat, "echo": True}, "echo"),
        ({**chat, "modalities": ["text", "audio"]}, "modalities"),
        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages"),
        ({**chat, "model": "lora0", "adapter": "lora1"}, "adapter"),
        ({**chat, "structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ]:
        r = post(family_server, "/v1/chat/completions", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())


def test_accepted_no_op_fields_change_nothing(family_server):
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
    plain = post(family_server, "/v1/completions", body).json()["choices"][0]["text"]
    extra = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "priority": 0,
             "prompt_cache_key": "k", "safety_identifier": "s", "cache_salt": "salt", "use_beam_search": False,
             "length_penalty": 1.0, "spaces_between_special_tokens": True, "guided_decoding_backend": "guidance"}
    r = post(family_server, "/v1/completions", {**body, **extra})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain


def test_constrained_neighbours_change_nothing_and_compile_off_the_engine_thread(family_server, monkeypatch):
    import threading

    grammars = family_server.engine.grammars
    threads, compile_ = [], grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda spec: threads.append(threading.current_thread().name)
                        or compile_(spec))
    plain = {"prompt": "The weather today", "max_tokens": 24, "temperature": 0, "adapter": "lora2"}
    alone = post(family_server, "/v1/completions", plain).json()["choices"][0]["text"]

    def constrained(i):
        return post(family_server, "/v1/completions", {
            "prompt": "Data:", "max_tokens": 40, "temperature": 1.0, "seed": i, "adapter": ["lora2", "lora0"][i % 2],
            "guided_json": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "boolean"}},
                            "required": ["k", "n"], "title": f"variant {i}"}})

    with ThreadPoolExecutor(5) as pool:
        crowd = [pool.submit(constrained, i) for i in range(4)]
        beside = pool.submit(post, family_server, "/v1/completions", plain)
        assert all(f.result().status_code == 200 for f in crowd)
        assert beside.result().json()["choices"][0]["text"] == alone
    assert len(threads) == 4 and all(t.startswith("quiver-prep") for t in threads)


def test_tool_choice_auto_with_a_named_parser(family_server):
    """With --tool-call-parser (or a template that writes <tool_call>), auto is served and read as Hermes'."""
    from quiver.server.http.limits import RequestLimits
    from quiver.server.http.prepare import Preparer
    from quiver.server.http.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Weather?"}],
                                                "tools": [WEATHER], "max_tokens": 4})
    job = Preparer(family_server.async_engine, RequestLimits(), "hermes").chat(req)
    assert job.tools.mode == "auto" and job.tools.parser == "hermes" and job.requests[0][0].params.grammar is None
