"""Reading model output as tool calls, whole and streamed in arbitrary pieces; the grammar pieces."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from quiver.server.engine.grammar import Grammars, json_spec, no_invented_keys
from quiver.server.http.tools import ToolOutput, ToolPlan, template_parser


def pieces(text: str, seed: int) -> list[str]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i:i + n])
        i += n
    return out


def streamed(plan: ToolPlan, text: str, seed: int) -> tuple[str, list[dict]]:
    """Content and calls rebuilt from the deltas, as a client reassembles them."""
    reader, content, calls = ToolOutput(plan), "", {}
    deltas = [d for p in pieces(text, seed) for d in reader.feed(p)] + reader.finish()
    for d in deltas:
        content += d.get("content") or ""
        for c in d.get("tool_calls") or []:
            call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            call["name"] += (c.get("function") or {}).get("name") or ""
            call["arguments"] += (c.get("function") or {}).get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


HERMES = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> done <tool_ <tool_call>not json'
          '</tool_call>')


@pytest.mark.parametrize("seed", range(6))
def test_hermes_calls_come_out_whole_and_streamed(seed):
    plan = ToolPlan("auto", [], parser="hermes")
    reader = ToolOutput(plan)
    reader.feed(HERMES)
    reader.finish()
    want_calls = [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reader.calls] == want_calls
    want_content = "I will check.\n\n done <tool_ <tool_call>not json"  # an unreadable call stays text
    assert reader.content == want_content and reader.finish_reason == "tool_calls"
    content, calls = streamed(plan, HERMES, seed)
    assert content == want_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want_calls


@pytest.mark.parametrize("seed", range(4))
def test_required_and_named_outputs(seed):
    text = '[{"name": "add", "parameters": {"a": 1, "b": {"x": "}]\\""}}}, {"name": "get_weather", "parameters": {}}]'
    content, calls = streamed(ToolPlan("required", []), text, seed)
    assert content == "" and [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": {"x": '}]"'}}), ("get_weather", {})]
    content, calls = streamed(ToolPlan("named", [], name="add"), '{"a": 3, "b": 4}', seed)
    assert calls == [{"name": "add", "arguments": '{"a": 3, "b": 4}'}]


@pytest.mark.parametrize("seed", range(3))
def test_required_and_named_output_cut_short_comes_back_as_content(seed):
    text = '[{"name": "add", "parameters": {"a": 1}}, {"name": "get_weather", "param'
    content, calls = streamed(ToolPlan("required", []), text, seed)
    assert content == text and [c["name"] for c in calls] == ["add"]  # the finished call stays
    reader = ToolOutput(ToolPlan("named", [], name="add"))
    reader.feed('{"a": 3, "b"')
    assert reader.finish() == [{"content": '{"a": 3, "b"'}] and reader.calls == []


def test_a_truncated_required_tool_call_returns_its_text_with_finish_reason_length(tiny_server):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
            "tool_choice": "required", "max_tokens": 6, "temperature": 0}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = httpx.post(tiny_server.url + "/v1/chat/completions", json={**body, "tool_choice": choice}, timeout=60)
        assert r.status_code == 200, r.text
        (c,) = r.json()["choices"]
        assert c["finish_reason"] == "length" and "tool_calls" not in c["message"], c
        assert c["message"]["content"].startswith("[" if choice == "required" else "{")  # what the grammar began
        assert r.json()["usage"]["completion_tokens"] == 6
    whole = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    content, finish = "", None
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line.removeprefix("data: "))["choices"]
                assert "tool_calls" not in choice["delta"]
                content += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    assert finish == "length" and content.strip() == whole["message"]["content"]


def test_the_template_says_whether_auto_can_be_read():
    assert template_parser("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}") == "hermes"
    assert template_parser("{{ messages }}") is None and template_parser(None) is None


def test_schemas_invent_no_keys_and_keep_their_data():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "const_data": {"const": {"properties": {}}}},
              "$defs": {"x": {"properties": {}, "additionalProperties": True}}}
    out = no_invented_keys(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # a map of names, not a schema
    assert out["properties"]["const_data"]["const"] == {"properties": {}}  # data is left alone
    assert out["$defs"]["x"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the request's own schema is not changed


def test_grammars_are_compiled_once_per_spec(tokenizer):
    grammars = Grammars(tokenizer, 49152, tokenizer.eos_token_id)
    spec = json_spec({"type": "integer"}, "guided_json")
    first = grammars.compile(spec)
    assert grammars.compile(json_spec({"type": "integer"}, "guided_json")) is first
    a, b = first.matcher(), first.matcher()
    assert a.accept(tokenizer.convert_tokens_to_ids("1")) and not b.finished  # each sequence has its own place


def test_a_bitmask_becomes_an_additive_row():
    import torch

    from quiver.server.engine.logit_adjust import bitmask_bias

    vocab = 77  # not a multiple of 32: the last word's high bits are beyond the vocabulary
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    bias = bitmask_bias(bitmask, vocab)
    for g in range(3):
        for t in range(vocab):
            allowed = (int(bitmask[g, t // 32]) >> (t % 32)) & 1
            assert bias[g, t].item() == (0.0 if allowed else float("-inf"))
