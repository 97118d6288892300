"""What an operator relies on: API keys, backpressure, time limits and the SIGTERM drain."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import LiveServer, all_blocks_free

from quiver.server.http.guard import Guard

USER, ADMIN = "user-key-123", "admin-key-456"


def make_server(api_model, tokenizer, guard: Guard, request_timeout=None) -> LiveServer:
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=96, block_size=4,
                                    max_model_len=128,
                                    served_model_name="tiny"), tokenizer=tokenizer)
    return LiveServer(AsyncEngine(engine, Metrics(), request_timeout=request_timeout), guard=guard)


@pytest.fixture(scope="module")
def guarded(api_model, tokenizer):
    with make_server(api_model, tokenizer, Guard(api_key=USER, admin_key=ADMIN, max_waiting=2)) as server:
        yield server


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def pause(server) -> threading.Event:
    """Hold the engine thread between two steps until the returned event is set."""
    entered, gate = threading.Event(), threading.Event()
    server.async_engine.submit(lambda _: (entered.set(), gate.wait(30)))
    assert entered.wait(10)
    return gate


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_api_key_guards_every_v1_route_and_metrics(guarded):
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, bearer("wrong"), {"Authorization": USER}):  # no key, a wrong key, no Bearer scheme
        r = httpx.post(guarded.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(guarded.url + "/v1/models", headers=headers).status_code == 401
        assert httpx.get(guarded.url + "/metrics", headers=headers).status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200
    for key in (USER, ADMIN):
        assert httpx.post(guarded.url + "/v1/completions", json=body, headers=bearer(key)).status_code == 200
        assert httpx.get(guarded.url + "/metrics", headers=bearer(key)).status_code == 200


def test_adapter_management_needs_the_admin_key(guarded):
    assert httpx.get(guarded.url + "/v1/adapters", headers=bearer(USER)).status_code == 401
    r = httpx.post(guarded.url + "/v1/load_lora_adapter", headers=bearer(USER),
                   json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert r.status_code == 401
    assert httpx.get(guarded.url + "/v1/adapters", headers=bearer(ADMIN)).status_code == 200


def test_openai_client_with_key(guarded):
    from openai import AuthenticationError, OpenAI

    ok = OpenAI(base_url=guarded.url + "/v1", api_key=USER)
    assert ok.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=guarded.url + "/v1", api_key="nope").completions.create(model="tiny", prompt="x", max_tokens=1)


def test_past_max_waiting_503_with_retry_after_and_nothing_lost(guarded):
    gate = pause(guarded)
    body = {"prompt": "a b c", "max_tokens": 3, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            queued = [pool.submit(httpx.post, guarded.url + "/v1/completions", json=body, headers=bearer(USER),
                                  timeout=60) for _ in range(2)]
            wait_for(lambda: guarded.async_engine.num_waiting() == 2)
            r = httpx.post(guarded.url + "/v1/chat/completions", headers=bearer(USER),
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
        finally:
            gate.set()
        assert [f.result().status_code for f in queued] == [200, 200]  # the queued ones still complete
    metrics = httpx.get(guarded.url + "/metrics", headers=bearer(USER)).text
    assert 'quiver_requests_rejected_total{reason="overloaded"} 1.0' in metrics
    assert httpx.post(guarded.url + "/v1/completions", json=body, headers=bearer(USER)).status_code == 200


def test_request_timeout_504_and_frees_everything(api_model, tokenizer):
    with make_server(api_model, tokenizer, Guard(), request_timeout=0.3) as server:
        engine = server.engine
        gate = pause(server)
        try:
            t0 = time.monotonic()
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 5}, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            assert 0.3 <= time.monotonic() - t0 < 5
            with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                              json={"prompt": "a b", "max_tokens": 5, "stream": True}) as s:
                lines = [line for line in s.iter_lines() if line]
            assert '"code": "request_timeout"' in lines[0] and "time limit" in lines[0]
            assert lines[-1] == "data: [DONE]"
        finally:
            gate.set()
        wait_for(lambda: not engine.has_work() and not server.async_engine.num_waiting())
        assert all_blocks_free(engine) and not engine.seqs
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200  # a request within the limit is served as before


def test_one_request_timeout_covers_preparation_and_generation(api_model, tokenizer, monkeypatch):
    """Preparation that takes most of the limit leaves generation only the rest: the 504 comes at the
    limit from arrival, not the limit after preparation ended."""
    from quiver.server.http.prepare import Preparer

    limit, prep_s = 2.0, 1.5
    completion = Preparer.completion

    def slow(self, *args):
        time.sleep(prep_s)
        return completion(self, *args)

    monkeypatch.setattr(Preparer, "completion", slow)
    with make_server(api_model, tokenizer, Guard(), request_timeout=limit) as server:
        gate = pause(server)
        try:
            t0 = time.monotonic()
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 5}, timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            gate.set()
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert limit <= elapsed < prep_s + limit - 0.5, elapsed
        wait_for(lambda: not server.engine.has_work() and not server.async_engine.num_waiting())
        assert all_blocks_free(server.engine) and not server.engine.seqs


def start_serve(api_model, tokenizer, tmp_path, *flags) -> tuple[subprocess.Popen, str]:
    """`quiver serve` on the tiny model (key USER) in a process of its own, its log in tmp_path/serve.log;
    (process, url)."""
    import socket

    model_dir = tmp_path / "model"
    shutil.copytree(api_model[0], model_dir)
    tokenizer.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "quiver"), "serve", "--model", str(model_dir), "--port", str(port),
           "--max-model-len", "256", "--num-kv-blocks", "64", "--log-level", "WARNING", *flags]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=os.environ | {"QUIVER_API_KEY": USER})
    return proc, f"http://127.0.0.1:{port}"


def test_sigterm_drains_in_flight_requests_then_exits_zero(api_model, tokenizer, tmp_path):
    proc, url = start_serve(api_model, tokenizer, tmp_path, "--shutdown-grace", "60")
    try:
        wait_for(lambda: _healthy(url), timeout=120)
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", headers=bearer(USER), timeout=60,
                          json={"prompt": "a b c", "max_tokens": 200, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.HTTPError):  # no longer accepting
                httpx.post(url + "/v1/completions", headers=bearer(USER), json={"prompt": "x"}, timeout=5)
            chunks += [line for line in lines if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) == 201  # every token of the in-flight request
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_past_the_grace_period_in_flight_requests_end_with_503_and_an_error_event(api_model, tokenizer, tmp_path):
    """Requests still running when --shutdown-grace ends get OpenAI's error shape (503 server_shutting_down;
    a stream its error event, then [DONE]) and one log line each, not uvicorn's plain 500 and traceback."""
    proc, url = start_serve(api_model, tokenizer, tmp_path, "--shutdown-grace", "1")
    long = {"prompt": "a b c", "max_tokens": 240, "ignore_eos": True, "n": 4}  # far longer than a second here
    try:
        wait_for(lambda: _healthy(url), timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            whole = pool.submit(httpx.post, url + "/v1/completions", headers=bearer(USER), json=long, timeout=60)
            with httpx.stream("POST", url + "/v1/completions", headers=bearer(USER), timeout=60,
                              json={**long, "stream": True}) as s:
                wait_for(lambda: _running(url) == 8)  # both requests' 4 choices
                proc.send_signal(signal.SIGTERM)
                lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            r = whole.result()
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_shutting_down" and "grace period" in r.json()["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        event = json.loads(lines[-2].removeprefix("data: "))
        assert event["error"]["code"] == "server_shutting_down" and event["error"]["type"] == "server_error"
        assert proc.wait(timeout=60) == 0
        log = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert log.count("still running when the shutdown grace period (1 s) ended") == 8  # 2 requests x n=4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_requests_stopped_at_shutdown_are_aborted_and_free_everything(api_model, tokenizer):
    with make_server(api_model, tokenizer, Guard()) as server:
        engine, body = server.engine, {"prompt": "a b", "max_tokens": 100, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60)
            stream = pool.submit(lambda: httpx.post(server.url + "/v1/completions", json={**body, "stream": True},
                                                    timeout=60).text.split("\n\n"))
            wait_for(lambda: len(engine.seqs) == 2)
            server.async_engine.stop_requests(1)
            assert whole.result().status_code == 503
            events = [e for e in stream.result() if e]
        assert '"code": "server_shutting_down"' in events[-2] and events[-1] == "data: [DONE]"
        wait_for(lambda: not engine.has_work())
        assert all_blocks_free(engine) and not engine.seqs
        late = httpx.post(server.url + "/v1/completions", json=body, timeout=60)  # one that started after
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"


def _running(url) -> int:
    metrics = httpx.get(url + "/metrics", headers=bearer(USER), timeout=5).text
    return int(float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith("quiver_num_requests_running "))))


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_cancelled_non_streaming_route_stops_its_engine_requests():
    """Ray Serve cancels a replica's call when its client leaves; collect() (the non-streaming routes')
    then closes every engine request it was reading at once, so none runs on for nobody."""
    import asyncio

    from quiver.server.http.streams import collect

    closed = []

    async def endless(i):
        try:
            while True:
                await asyncio.sleep(0.01)
                yield i
        finally:
            closed.append(i)

    class Connected:
        async def is_disconnected(self):
            return False

    async def main():
        task = asyncio.create_task(collect(Connected(), [endless(0), endless(1)]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(closed) == [0, 1]

    asyncio.run(main())
