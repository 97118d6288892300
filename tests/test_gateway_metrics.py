"""The vLLM metric names LoRA-aware Kubernetes gateways scrape from /metrics (Gateway API Inference
Extension, model-server protocol), and quiver_step_adapters."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from helpers import LiveServer
from peft_fixtures import lora_variants, make_adapter
from prometheus_client.parser import text_string_to_metric_families

from quiver.adapters.paths import InvalidName, check_name
from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import OTHER, Metrics
from quiver.server.engine.outputs import EngineStats
from quiver.server.families.residency import AdapterEvent
from quiver.server.http.app import create_app

NAMES = ("lora_qv", "dora")  # both LoRA-family: each takes a device slot


@pytest.fixture(scope="module")
def adapters(api_model, tmp_path_factory):
    """Two LoRA adapters for api_model (SmolLM2's vocabulary, so text prompts work)."""
    _, hf = api_model
    root = tmp_path_factory.mktemp("gateway_loras")
    variants = lora_variants(hf.config.num_hidden_layers)
    for i, name in enumerate(NAMES):
        make_adapter(hf, root / name, variants[name], seed=800 + i, scale=0.3)
    return {name: root / name for name in NAMES}


@contextlib.contextmanager
def serve(api_model, tokenizer, adapters, max_loras: int):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=256, block_size=4,
                                    max_model_len=256, served_model_name="tiny", max_loras=max_loras),
                       tokenizer=tokenizer)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path))
    with LiveServer(AsyncEngine(engine, Metrics())) as server:
        yield server


class Stream:
    """A long streaming completion on its own thread: `first` is set at its first token; close() drops the
    connection (the server aborts the request) at the next token it reads."""

    def __init__(self, server, adapter: str, max_tokens: int = 220):
        self.first, self._closed = threading.Event(), threading.Event()
        body = {"model": adapter, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self.thread = threading.Thread(target=self._run, args=(server.url + "/v1/completions", body), daemon=True)
        self.thread.start()

    def _run(self, url, body) -> None:
        with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    self.first.set()
                if self._closed.is_set():
                    return

    def close(self) -> None:
        self._closed.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def scrape(server) -> dict:
    """name -> list of samples (name, labels, value) for every metric family on /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def lora_info(metrics) -> tuple[dict, float]:
    (sample,) = metrics["vllm:lora_requests_info"]  # only the current series is kept
    return sample[1], sample[2]


def gauge(metrics, name) -> float:
    (sample,) = metrics[name]
    return sample[2]


def poll(server, cond, timeout: float = 10.0) -> dict:
    """Scrape /metrics until cond(metrics) holds; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(server)
        if cond(metrics):
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.02)


def pause(server) -> threading.Event:
    """Hold the engine thread between two steps (so /metrics stays as the last step left it) until set."""
    entered, gate = threading.Event(), threading.Event()
    server.async_engine.submit(lambda _: (entered.set(), gate.wait(30)))
    assert entered.wait(10)
    return gate


def idle(metrics) -> bool:
    return (lora_info(metrics)[0]["running_lora_adapters"] == "" and
            gauge(metrics, "vllm:num_requests_running") == 0)


def test_running_adapters_and_step_mix(api_model, tokenizer, adapters):
    with serve(api_model, tokenizer, adapters, max_loras=2) as server:
        streams = []
        for name in NAMES:
            streams.append(Stream(server, name))
            assert streams[-1].first.wait(30)
        gate = pause(server)
        try:
            metrics = scrape(server)
        finally:
            gate.set()
        labels, value = lora_info(metrics)
        assert labels == {"max_lora": "2", "running_lora_adapters": ",".join(sorted(NAMES)),
                          "waiting_lora_adapters": ""}
        assert abs(value - time.time()) < 10
        assert gauge(metrics, "vllm:num_requests_running") >= 2
        assert gauge(metrics, "vllm:num_requests_waiting") == gauge(metrics, "quiver_num_requests_waiting")
        usage = gauge(metrics, "vllm:kv_cache_usage_perc")
        assert 0 < usage <= 1 and gauge(metrics, "vllm:gpu_cache_usage_perc") == usage
        for s in streams:  # the engine learns of it from the aborts, between steps: the idle loop must say so
            s.close()
        metrics = poll(server, idle, timeout=2.0)
        hist = {(s[0], s[1].get("le")): s[2] for s in metrics["quiver_step_adapters"]}
        count = hist[("quiver_step_adapters_count", None)]
        assert count > 0
        assert hist[("quiver_step_adapters_bucket", "1.0")] < count  # some step ran both adapters


def test_adapter_over_max_loras_waits(api_model, tokenizer, adapters):
    a, b = NAMES
    with serve(api_model, tokenizer, adapters, max_loras=1) as server:
        first = Stream(server, a)
        assert first.first.wait(30)
        second = Stream(server, b)
        metrics = poll(server, lambda m: lora_info(m)[0]["waiting_lora_adapters"] == b)
        assert lora_info(metrics)[0] == {"max_lora": "1", "running_lora_adapters": a, "waiting_lora_adapters": b}
        assert gauge(metrics, "vllm:num_requests_waiting") >= 1
        first.close()
        assert second.first.wait(30)  # a's slot freed: b runs
        second.close()
        metrics = poll(server, idle, timeout=2.0)
        assert lora_info(metrics)[0]["waiting_lora_adapters"] == ""
        assert gauge(metrics, "vllm:num_requests_waiting") == 0


def test_one_lora_series_is_kept():
    """vLLM lets old label sets pile up; only the latest one is exposed here."""
    metrics = Metrics()
    base = dict(running=1, waiting=1, kv_usage=0.5, preemptions=0, adapters_resident={}, adapter_evictions={},
                step_failures=0, healthy=True, max_loras=4)
    metrics.observe_step(EngineStats(**base, running_lora_adapters=("a",), waiting_lora_adapters=("b",)), [])
    metrics.observe_step(EngineStats(**base, running_lora_adapters=("b", "c"), waiting_lora_adapters=()), [],
                         ran_rows=True)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    (sample,) = families["vllm:lora_requests_info"].samples
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "b,c", "waiting_lora_adapters": ""}
    assert families["vllm:kv_cache_usage_perc"].samples[0].value == 0.5
    counts = {s.name: s.value for s in families["quiver_step_adapters"].samples if s.name.endswith("_count")}
    assert counts == {"quiver_step_adapters_count": 1.0}  # the step that found nothing to run is not observed


STATS = EngineStats(running=0, waiting=0, kv_usage=0.0, preemptions=0, adapters_resident={}, adapter_evictions={},
                    step_failures=0, healthy=True, max_loras=4, running_lora_adapters=(), waiting_lora_adapters=())


def finished(adapter: str | None):
    """One request's only output, finished, as observe_step reads it."""
    seq = SimpleNamespace(adapter=adapter, num_output_tokens=1, arrival_time=0.0, first_token_time=0.1,
                          first_scheduled_time=0.05, last_token_time=0.1, prev_token_time=None,
                          num_prompt_tokens=3, num_cached_tokens=0)
    return SimpleNamespace(seq=seq, error=None, new_token_ids=[1], finished=True, finish_reason="stop",
                           num_draft_tokens=0, num_accepted_tokens=0)


def series_of(metrics, adapter: str) -> list[str]:
    return [s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
            if s.labels.get("adapter") == adapter]


def test_an_unloaded_adapter_has_no_series_left():
    metrics = Metrics()
    metrics.observe_step(STATS, [finished("a"), finished("b"), finished(None)])
    assert len(series_of(metrics, "a")) > 50  # the histograms' buckets, the counters
    metrics.observe_events([AdapterEvent("unload", "lora", "a"), AdapterEvent("unload", None, "gone")])
    assert series_of(metrics, "a") == []
    assert series_of(metrics, "b") == series_of(metrics, "base") != []
    unloads = [s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
               if s.name == "quiver_adapter_unloads_total"]
    assert [(s.labels, s.value) for s in unloads] == [({"family": "lora"}, 1.0)]  # a disk-only one counts none


def test_adapters_past_the_cap_share_the_other_label():
    metrics = Metrics(max_adapters=2)
    metrics.observe_step(STATS, [finished(f"a{i}") for i in range(5)] + [finished(None)])
    requests = {s.labels["adapter"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
                for s in f.samples if s.name == "quiver_requests_total"}
    assert requests == {"a0": 1.0, "a1": 1.0, OTHER: 3.0, "base": 1.0}
    metrics.observe_events([AdapterEvent("unload", "lora", "a0")])  # frees a place under the cap
    metrics.observe_step(STATS, [finished("a5"), finished("a2")])
    requests = {s.labels["adapter"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
                for s in f.samples if s.name == "quiver_requests_total"}
    assert requests == {"a1": 1.0, "a5": 1.0, OTHER: 4.0, "base": 1.0}


def test_no_adapter_can_take_the_base_or_other_label():
    with pytest.raises(InvalidName):
        check_name("base")
    with pytest.raises(InvalidName):
        check_name(OTHER)


def test_a_scrape_renders_off_the_event_loop(tiny_lora_set, plain_tokenizer, monkeypatch):
    """While a render is held, /health still answers: the render does not run on the event loop."""
    base_dir, _, _ = tiny_lora_set
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=32, max_model_len=64),
                       tokenizer=plain_tokenizer)
    started, release, real = threading.Event(), threading.Event(), Metrics.render

    def held(self):
        started.set()
        release.wait(10)
        return real(self)

    monkeypatch.setattr(Metrics, "render", held)

    async def main():
        transport = httpx.ASGITransport(app=create_app(AsyncEngine(engine, Metrics())))
        async with httpx.AsyncClient(transport=transport, base_url="http://quiver") as client:
            scrape = asyncio.create_task(client.get("/metrics"))
            await asyncio.to_thread(started.wait, 10)
            health = await client.get("/health")
            during = not scrape.done()
            release.set()
            return during, health, await scrape

    during, health, scrape = asyncio.run(main())
    assert during and health.status_code == 200 and scrape.status_code == 200
