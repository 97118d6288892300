"""`quiver ray serve` on a local Ray cluster on loopback: two replicas of a tiny model behind the OpenAI
ingress, driven with the openai client and compared with a single server built from the same flags.

One cluster serves the whole module (about a minute on 2 cores), in order: the affinity test sends each
adapter's first requests while no replica holds it yet, and the replica-loss test runs last. The SIGTERM
test runs first, before that cluster starts: it starts `quiver ray serve` with a cluster of its own.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from helpers import LiveServer

pytestmark = pytest.mark.ray

ADAPTERS = ["lora_qv", "rslora_all7", "dora", "lora_r16_ko", "prompt_tuning"]
PROMPTS = ["t5 t6 t7", "t9 t8 t30 t31", "t50 t7", "t44 t45 t46 t47 t48"]


def _args(model: Path, adapter_dir: Path, port: int) -> argparse.Namespace:
    """Two replicas sharing the cores; API loads may read anything under the adapter dir's parent."""
    from quiver.server.assemble import take_model_tag
    from quiver.server.rayserve.app import add_ray_serve_args

    p = argparse.ArgumentParser()
    add_ray_serve_args(p)
    args = p.parse_args(["--model", str(model), "--adapter-dir", str(adapter_dir), "--replicas", "2",
                         "--adapter-root", str(adapter_dir.parent),
                         "--num-cpus-per-replica", "0", "--num-threads", "1", "--dtype", "float32",
                         "--max-model-len", "256", "--num-kv-blocks", "256", "--port", str(port),
                         "--shutdown-grace", "1"])
    take_model_tag(args)
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_lora_set, tiny_prompt_set, plain_tokenizer, tmp_path_factory):
    """The Ray Serve app on a fresh local cluster; afterwards Serve and Ray are down and every process
    Ray started is gone, and nothing was written to the home directory."""
    from quiver.server.rayserve.app import start, stop

    base_dir, _, loras = tiny_lora_set
    root = tmp_path_factory.mktemp("ray")
    model = root / "tiny"
    shutil.copytree(base_dir, model)
    plain_tokenizer.save_pretrained(model)
    adapter_dir = root / "adapters"
    for name in ADAPTERS:
        shutil.copytree(loras.get(name) or tiny_prompt_set[2][name], adapter_dir / name)
    shutil.copytree(loras["lora_r1_mlp"], root / "extra" / "api1")  # outside --adapter-dir: loaded through the API
    args = _args(model, adapter_dir, _free_port())
    home = Path.home()
    home_before = set(os.listdir(home)) if home.is_dir() else set()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # Ray's Unix sockets need a short path
    threads = torch.get_num_threads()
    try:
        start(args, ray_init={"num_cpus": 2, "_temp_dir": temp, "object_store_memory": 200 << 20})
        ray_children = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
        yield args, f"http://127.0.0.1:{args.port}", adapter_dir, root
    finally:
        stop()
        torch.set_num_threads(threads)
        shutil.rmtree(temp, ignore_errors=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in ray_children):
        time.sleep(0.5)
    assert not [p.pid for p in ray_children if _alive(p)], "Ray processes outlived ray.shutdown()"
    assert not (home / ".ray").exists() or ".ray" in home_before, "Ray wrote ~/.ray"
    assert (set(os.listdir(home)) if home.is_dir() else set()) <= home_before | {".cache"}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_drains_the_in_flight_stream_then_shuts_ray_down_and_exits_zero(tiny_models, plain_tokenizer,
                                                                                 tmp_path):
    """What Docker, Kubernetes and systemd send: the stream under way gets every token, new requests are
    refused, the program exits 0 and every Ray process it started (found by its session directory) is gone."""
    import subprocess
    import sys

    model = tmp_path / "tiny"
    shutil.copytree(tiny_models["llama_gqa"][0], model)
    plain_tokenizer.save_pretrained(model)
    port = _free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "stderr.log"
    temp = tempfile.mkdtemp(prefix="qs", dir="/tmp")  # Ray's Unix sockets need a short path
    cmd = [str(Path(sys.executable).parent / "quiver"), "ray", "serve", str(model), "--port", str(port),
           "--num-cpus-per-replica", "0", "--num-threads", "1", "--dtype", "float32", "--max-model-len", "256",
           "--num-kv-blocks", "64", "--shutdown-grace", "60"]
    with open(log, "w") as err:  # a file, not a pipe: nothing blocks on a full pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=os.environ | {"RAY_TMPDIR": temp})
    try:
        deadline = time.monotonic() + 240
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        assert _ray_processes(temp), "no Ray process found by its session directory"
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "t5 t6", "max_tokens": 200, "ignore_eos": True,
                                "stream": True}) as s:
            lines = s.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            late = _status(f"{url}/v1/completions", {"model": "tiny", "prompt": "t5", "max_tokens": 2})
            assert late != 200, "a request sent after SIGTERM was served"  # 503 while draining, then 404 or none
            chunks += [line for line in lines if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) == 201, chunks[-3:]  # every token of it
        assert proc.wait(timeout=180) == 0, log.read_text()
        assert "SIGTERM received" not in log.read_text()
        assert not _ray_processes(temp), "Ray processes outlived quiver ray serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _ray_processes(temp):
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _healthy(url: str) -> bool:
    return _status(f"{url}/v1/models") == 200


def _status(url: str, body: dict | None = None) -> int | None:
    """The HTTP status, None when nothing answers."""
    try:
        return (httpx.post(url, json=body, timeout=30) if body else httpx.get(url, timeout=5)).status_code
    except httpx.HTTPError:
        return None


def _ray_processes(temp: str) -> list[psutil.Process]:
    """The live processes whose command line names Ray's directory `temp` (raylet, gcs_server, workers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp in arg for arg in p.info["cmdline"] or []) and _alive(p):
            found.append(p)
    return found


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _completion(client: openai.OpenAI, model: str, prompt: str, stream: bool, max_tokens: int = 12) -> tuple:
    """(text, the replica that served it) through the openai client, streamed or not."""
    kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not stream:
        raw = client.completions.with_raw_response.create(**kw)
        return raw.parse().choices[0].text, raw.headers.get("x-quiver-replica")
    with client.completions.with_streaming_response.create(stream=True, **kw) as raw:
        text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
        return text, raw.headers.get("x-quiver-replica")


def _replica_of(header: str | None) -> str:
    assert header, "the response names no replica"
    return header.split()[0]


def _engine_handle(adapter: str = ""):
    from ray import serve

    return serve.get_deployment_handle("QuiverEngine", app_name="quiver").options(multiplexed_model_id=adapter)


def test_each_adapter_stays_on_one_replica_and_a_replica_mixes_adapters(cluster):
    """Under light load every request for an adapter lands on the replica that already holds it, and the
    adapters spread over both replicas; a burst for one replica's adapters shares its steps."""
    _, url, _, _ = cluster
    client = _client(url)
    served: dict[str, set[str]] = {}
    for _ in range(3):
        for name in ADAPTERS:
            served.setdefault(name, set()).add(_replica_of(_completion(client, name, "t5 t6", stream=False)[1]))
    assert all(len(replicas) == 1 for replicas in served.values()), served
    by_replica: dict[str, list[str]] = {}
    for name, (replica,) in served.items():
        by_replica.setdefault(replica, []).append(name)
    assert len(by_replica) == 2, by_replica
    replica, names = max(by_replica.items(), key=lambda kv: len(kv[1]))
    assert len(names) >= 2

    def histogram_counts() -> tuple[float, float]:
        info = _engine_handle(names[0]).replica_info.remote().result()
        assert info["replica"] == replica
        family = next(f for f in text_string_to_metric_families(info["metrics"]) if f.name == "quiver_step_adapters")
        count = next(s.value for s in family.samples if s.name.endswith("_count"))
        one = next(s.value for s in family.samples if s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0)
        return count, one

    burst = [threading.Thread(target=_completion, args=(client, names[k % len(names)], PROMPTS[k % 4], k % 2 == 0, 40))
             for k in range(16)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    count, at_most_one = histogram_counts()
    assert count > at_most_one, "no step on that replica ran more than one adapter"


def test_outputs_equal_a_single_server(cluster):
    """Mixed-adapter traffic, streamed and not, all at once: the same text as one `quiver serve` with the
    same flags gives each request (greedy, float32: a row's output does not depend on its batch)."""
    from quiver.server.assemble import build_server

    args, url, _, _ = cluster
    client = _client(url)
    jobs = [(model, prompt, k % 2 == 1) for k, (model, prompt) in
            enumerate((m, p) for m in ["tiny", *ADAPTERS] for p in PROMPTS)]
    got: dict[int, str] = {}

    def run(k):
        got[k] = _completion(client, *jobs[k])[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with LiveServer(build_server(args)[0]) as single:
        want = {k: _completion(_client(single.url), *job)[0] for k, job in enumerate(jobs)}
        for bad in ({"model": "no-such-adapter", "prompt": "t5"}, {"model": "tiny", "prompt": "t5", "top_p": 7}):
            ours, theirs = httpx.post(f"{url}/v1/completions", json=bad), httpx.post(f"{single.url}/v1/completions",
                                                                                       json=bad)
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
    assert got == want
    assert len(set(want.values())) > len(PROMPTS), "the adapters should change the outputs"


def test_models_lists_the_union_and_new_adapter_folders(cluster, tiny_lora_set):
    """GET /v1/models lists the base and every adapter; a folder put into the shared --adapter-dir while
    serving is served by name at once and listed within a second, whichever replica answers."""
    _, url, adapter_dir, _ = cluster
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert ids == {"tiny", *ADAPTERS}
    shutil.copytree(tiny_lora_set[2]["adalora"], adapter_dir / "late")
    text, _ = _completion(_client(url), "late", "t5 t6", stream=False)
    assert text
    time.sleep(1.5)  # each replica lists the folder again at most once a second (families.discovery.INTERVAL)
    for _ in range(6):  # both replicas answer some of these
        assert "late" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_api_loads_and_unloads_reach_every_replica(cluster):
    """vLLM's load route loads on one replica; the next call reaching the other applies it there too (the
    adapter is known and served by both); a second load of the name is a 409; an unload leaves it on
    neither, and a request for it is then a 404."""
    _, url, _, _ = cluster
    client = _client(url)
    one_per_replica = {_replica_of(_completion(client, name, "t5", stream=False)[1]): name for name in ADAPTERS}
    assert len(one_per_replica) == 2

    def adapters_of_each_replica() -> list[list[str]]:
        for name in one_per_replica.values():  # a call through the ingress: each replica catches up first
            _completion(client, name, "t5", stream=False)
        infos = [_engine_handle(name).replica_info.remote().result() for name in one_per_replica.values()]
        assert [i["replica"] for i in infos] == list(one_per_replica)
        return [i["adapters"] for i in infos]

    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "api1", "lora_path": "extra/api1"})
    assert loaded.status_code == 200, loaded.text
    assert all("api1" in names for names in adapters_of_each_replica())
    assert _completion(client, "api1", "t5 t6", stream=False)[0]
    again = httpx.post(f"{url}/v1/adapters", json={"name": "api1", "path": "extra/api1"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_exists"
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "api1"}).status_code == 200
    assert not any("api1" in names for names in adapters_of_each_replica())
    gone = httpx.post(f"{url}/v1/completions", json={"model": "api1", "prompt": "t5"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_lost_replica_fails_only_its_started_streams(cluster):
    """SIGKILL the replica serving an adapter while two of its streams and two non-streamed requests run:
    the streams end with an error event, the others are retried on the other replica and succeed, traffic
    for every adapter goes on, and Serve starts a replacement."""
    _, url, _, _ = cluster
    client = _client(url)
    _, header = _completion(client, "dora", "t5", stream=False)
    victim, pid = _replica_of(header), int(header.split()[1])
    assert pid in {p.pid for p in psutil.Process().children(recursive=True)}, "the replica is not ours"
    started = threading.Barrier(3)
    outcome: dict[str, object] = {}

    def stream(k):
        try:
            chunks = client.completions.create(model="dora", prompt="t5 t6", max_tokens=240, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            for i, _ in enumerate(chunks):
                if i == 0:
                    started.wait()
            outcome[f"stream{k}"] = "finished"
        except openai.APIError as exc:
            outcome[f"stream{k}"] = exc

    def plain(k):
        raw = client.completions.with_raw_response.create(model="dora", prompt="t5 t6", max_tokens=240,
                                                          temperature=0, extra_body={"ignore_eos": True})
        outcome[f"plain{k}"] = (len(raw.parse().choices[0].text.split()), _replica_of(raw.headers["x-quiver-replica"]))

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=plain, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    for k in range(2):
        exc = outcome[f"stream{k}"]
        assert isinstance(exc, openai.APIError) and "replica serving this stream was lost" in str(exc), exc
        assert outcome[f"plain{k}"][0] == 240 and outcome[f"plain{k}"][1] != victim, outcome
    for name in ["tiny", *ADAPTERS]:  # traffic goes on at once, on the survivor
        assert _completion(client, name, "t5 t6", stream=False)[0]
    deadline, seen = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        seen.add(_engine_handle().replica_info.remote().result()["replica"])
        if len(seen - {victim}) == 2:
            break
        time.sleep(0.5)
    assert len(seen - {victim}) == 2, f"no replacement replica came up: {seen}"


def test_quiver_ray_serve_refuses_a_bad_flag_before_ray_starts():
    import subprocess
    import sys

    quiver = str(Path(sys.executable).parent / "quiver")
    proc = subprocess.run([quiver, "ray", "serve", "--adapter", "no-equals-sign"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["quiver ray serve: error: --adapter expects NAME=PATH, got "
                                                "'no-equals-sign'"]


def test_a_replica_holds_an_adapter_only_for_a_key_that_may_use_it():
    """A request without a key, or out of its key's scope, makes no replica look the name up or lease it."""
    from quiver.server.http.guard import Guard
    from quiver.server.http.tenants import Access, digest
    from quiver.server.rayserve.asgi_call import HttpCall
    from quiver.server.rayserve.deployments import may_hold

    guard = Guard(tenants=[(digest("key-a"), Access(tenant="a", adapters=("a-*",), admin=False))])

    def call(key: str | None) -> HttpCall:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        return HttpCall("POST", "/v1/completions", b"", headers, b"{}")

    assert may_hold(guard, call("key-a"), "a-sql")
    assert not may_hold(guard, call("key-a"), "b-sql")
    assert not may_hold(guard, call(None), "a-sql")
    assert not may_hold(guard, call("wrong"), "a-sql")
    assert may_hold(Guard(), call(None), "anything")  # no keys: every route is open
