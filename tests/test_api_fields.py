"""The vLLM fields beyond sampling, through the live API: each does what vLLM does with it."""
from __future__ import annotations

import json

import httpx

GREEDY = {"max_tokens": 8, "temperature": 0}


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_n_choices_are_seeded_indexed_and_counted_once(tiny_server):
    body = {"prompt": "Once upon a time", "n": 4, "seed": 3, "max_tokens": 6, "temperature": 1.0}
    a, b = post(tiny_server, "/v1/completions", body), post(tiny_server, "/v1/completions", body)
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3] and texts == [c["text"] for c in b["choices"]]
    assert len(set(texts)) > 1
    alone = [post(tiny_server, "/v1/completions", {**body, "n": 1, "seed": 3 + j})["choices"][0]["text"]
             for j in range(4)]
    assert texts == alone  # choice j is the request with seed + j
    prompt_tokens = post(tiny_server, "/v1/completions", {**body, "n": 1})["usage"]["prompt_tokens"]
    assert a["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    two = post(tiny_server, "/v1/completions", {**body, "prompt": ["Hello", "Once upon a time"], "n": 2})
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][2]["text"] == texts[0] and two["choices"][3]["text"] == texts[1]  # prompt-major


def test_streamed_choices_and_running_usage(tiny_server):
    chunks = events(tiny_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "n": 3, "seed": 1, "max_tokens": 5,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            by_index[c["index"]] = by_index.get(c["index"], "") + (c["delta"].get("content") or "")
    assert sorted(by_index) == [0, 1, 2]
    running = [ch["usage"]["completion_tokens"] for ch in chunks[:-1] if ch.get("usage")]
    assert running == sorted(running) and running[-1] == 15
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 15


def test_prompt_fields(tiny_server, tokenizer):
    full = post(tiny_server, "/v1/completions", {"prompt": "a b c d e f g h", **GREEDY})
    cut = post(tiny_server, "/v1/completions", {"prompt": "a b c d e f g h", "truncate_prompt_tokens": 3, **GREEDY})
    ids = tokenizer("a b c d e f g h").input_ids
    assert cut["usage"]["prompt_tokens"] == 3 < full["usage"]["prompt_tokens"]
    assert cut["choices"][0]["text"] == post(tiny_server, "/v1/completions", {"prompt": ids[-3:], **GREEDY})[
        "choices"][0]["text"]
    named = post(tiny_server, "/v1/completions", {"prompt": "x", "request_id": "abc123", **GREEDY})
    assert named["id"] == "cmpl-abc123"


def test_chat_template_fields(tiny_server, tokenizer):
    messages = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "The answer is"}]
    cont = post(tiny_server, "/v1/chat/completions", {"messages": messages, "continue_final_message": True,
                                                      "add_generation_prompt": False, **GREEDY})
    want = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    assert cont["usage"]["prompt_tokens"] == len(want)
    bare = post(tiny_server, "/v1/chat/completions", {"messages": messages[:1], "add_generation_prompt": False,
                                                      **GREEDY})
    assert bare["usage"]["prompt_tokens"] == len(tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=False, tokenize=True, return_dict=False))


def test_stop_strings_and_special_tokens(tiny_server, tokenizer):
    plain = post(tiny_server, "/v1/completions", {"prompt": "Hello", **GREEDY})["choices"][0]["text"]
    stop = plain[3:6]
    cut = post(tiny_server, "/v1/completions", {"prompt": "Hello", "stop": [stop], **GREEDY})["choices"][0]
    kept = post(tiny_server, "/v1/completions", {"prompt": "Hello", "stop": [stop], "include_stop_str_in_output": True,
                                                 **GREEDY})["choices"][0]
    assert cut["text"] == plain[:plain.index(stop)] and kept["text"] == plain[:plain.index(stop) + len(stop)]
    eos = tokenizer.eos_token_id
    forced = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {str(eos): 100}}
    assert post(tiny_server, "/v1/completions", forced)["choices"][0]["text"] == ""
    shown = post(tiny_server, "/v1/completions", {**forced, "skip_special_tokens": False})["choices"][0]["text"]
    assert shown == tokenizer.eos_token * 3
