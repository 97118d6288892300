"""The HTTP API on a live loopback server: OpenAI client, streaming, errors, disconnects."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from helpers import all_blocks_free, hf_greedy


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def test_health_and_models(tiny_server, client):
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_greedy_completion_matches_transformers(tiny_server, api_model, tokenizer, client):
    hf = api_model[1]
    prompt = [17, 200, 33, 4, 99]
    want = hf_greedy(hf, prompt, 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    choice = r.choices[0]
    assert choice.text == tokenizer.decode(want[: len(want) - (want[-1] == 2)], skip_special_tokens=True)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(want)
    assert len(choice.logprobs.token_logprobs) == len(want)


def test_completion_prompt_forms(tiny_server, client, tokenizer):
    r = client.completions.create(model="tiny", prompt=["Hello there", "Bye"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    n_prompt = len(tokenizer("Hello there").input_ids) + len(tokenizer("Bye").input_ids)
    assert r.usage.prompt_tokens == n_prompt
    r2 = client.completions.create(model="tiny", prompt=[[5, 6], [7, 8, 9]], max_tokens=2, temperature=0)
    assert len(r2.choices) == 2 and r2.usage.prompt_tokens == 5


def test_streaming_equals_non_streaming(tiny_server, client):
    kw = dict(model="tiny", prompt="Streams and rivers", max_tokens=16, temperature=0.9, seed=7)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]


def test_raw_sse_ends_with_done(tiny_server):
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "x y", "max_tokens": 3, "stream": True}) as r:
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    assert all(l.startswith("data: ") for l in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_and_chat_streaming(tiny_server, client):
    msgs = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, seed=1)
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    assert r.usage.prompt_tokens > 5


def test_chat_logprobs(tiny_server, client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_echo_with_logprobs(tiny_server, tokenizer):
    prompt = "one two three"
    body = post(tiny_server, "/v1/completions",
                {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}).json()
    choice = body["choices"][0]
    n_prompt = len(tokenizer(prompt).input_ids)
    assert choice["text"].startswith(tokenizer.decode(tokenizer(prompt).input_ids))
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_bodies_hold_what_their_route_set(tiny_server):
    """null where the route sets None (a choice's logprobs and finish_reason), absent where it sets nothing
    (usage before a stream's last chunk, the fields a delta does not carry)."""
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all("usage" not in e for e in events[:-1]) and events[-1]["choices"] == [] and events[-1]["usage"]
    assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    assert all(set(e["choices"][0]["delta"]) <= {"content"} for e in events[1:-1])
    body = post(tiny_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert body["choices"][0]["logprobs"] is None


BAD_REQUESTS = [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "max_tokens": 500}, "max_tokens"),
    ({"prompt": [1, 2, 99999999]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 300}, "n"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 9}, "logprobs"),
    # fields that would change the output, refused by name rather than ignored
    ({"prompt": "hi", "suffix": "!"}, "suffix"),
    ({"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "hi", "length_penalty": 2.0}, "length_penalty"),
    ({"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": "hi", "no_such_field": 1}, "no_such_field"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "min_tokens": 99, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ({"prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"prompt": "hi", "guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"prompt": "hi", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS)
def test_bad_completion_requests_get_400_naming_the_field(tiny_server, body, param):
    r = post(tiny_server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_malformed_json_and_bad_chat(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", content=b'{"prompt": "x",', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = post(tiny_server, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_the_base_model_is_also_named_by_its_path(tiny_server, api_model):
    """vLLM serves a model under its --model argument: a client configured with the path is served by the
    base model, and the response carries the served name."""
    r = post(tiny_server, "/v1/completions", {"model": str(api_model[0]), "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny"


def test_models_show_the_dtype(tiny_server):
    assert [(m["id"], m["dtype"]) for m in httpx.get(tiny_server.url + "/v1/models").json()["data"]] == \
        [("tiny", "float32")]


def test_an_unknown_model_is_a_404_naming_model_and_what_is_available(tiny_server):
    r = post(tiny_server, "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user",
                                                                                        "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "model 'no-such-model' does not exist; available: tiny", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    r = post(tiny_server, "/v1/completions", {"prompt": "hi", "adapter": "sql-lora"})  # named as an adapter: as before
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter"
    assert r.json()["error"]["message"] == "adapter 'sql-lora' does not exist"


def test_unknown_adapter_or_model_is_404(tiny_server, client):
    for body in ({"prompt": "hi", "adapter": "sql-lora"}, {"prompt": "hi", "model": "no-such-model"}):
        r = post(tiny_server, "/v1/completions", body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"adapter": "missing"})
    # and the server still serves
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=1).choices


def _wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def slow_steps(tiny_server, monkeypatch):
    """Each engine step takes at least 20 ms, so a long request is still running when the client leaves."""
    step = tiny_server.engine.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(tiny_server.engine, "step", slow)


def test_disconnect_mid_stream_aborts_and_frees_blocks(tiny_server, slow_steps):
    engine = tiny_server.engine
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "a b c", "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(l.startswith("data: ") for l in got)
        assert engine.has_work()  # still generating when we hang up
    _wait_for(lambda: not engine.has_work())
    assert all_blocks_free(engine)


def test_disconnect_non_streaming_aborts(tiny_server, slow_steps):
    engine = tiny_server.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", timeout=0.5,
                   json={"prompt": "a b c", "max_tokens": 120, "ignore_eos": True, "temperature": 0.5})
    _wait_for(lambda: not engine.has_work())
    assert all_blocks_free(engine)


def test_metrics_exposed(tiny_server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3)
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ("quiver_time_to_first_token_seconds_bucket", "quiver_inter_token_latency_seconds_bucket",
                 "quiver_e2e_request_latency_seconds_bucket", "quiver_request_queue_time_seconds_bucket",
                 "quiver_num_requests_running", "quiver_num_requests_waiting", "quiver_kv_cache_usage_ratio",
                 "quiver_prompt_tokens_total", "quiver_generation_tokens_total"):
        assert name in text, name
    assert 'quiver_generation_tokens_total{adapter="base"}' in text
