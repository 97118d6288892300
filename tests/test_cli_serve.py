"""`quiver serve` as a process, typed as a vLLM user types it: the model as an argument, --lora-modules,
vLLM's LoRA page run as printed, one-line refusals (port in use, no CUDA), and a log without progress bars."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_gguf
from test_cli import VLLM_LORA_SERVE, as_quiver

QUIVER = str(Path(sys.executable).parent / "quiver")


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory) -> str:
    """The tiny GQA model with a tokenizer beside it: a folder `quiver serve` loads in seconds. The tokenizer is
    character-level, so that any English prompt has tokens (the word-level plain_tokenizer, saved, can lose its
    <unk>, which shares id 0 with t0)."""
    from quiver.bench.models import random_tokenizer

    path = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(tiny_models["llama_gqa"][0], path)
    random_tokenizer(tiny_models["llama_gqa"][1].config.vocab_size).save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiver_serve(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([QUIVER, "serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}), cwd=cwd)


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while not _healthy(url):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as a service manager stops it; its log once it has exited 0."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def refusal(*args: str) -> str:
    """The one line `quiver serve ARGS` exits with (status 2) before it loads a model."""
    proc = quiver_serve(*args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_served_start_from_a_gguf_argument_with_lora_modules(tiny_lora_set, tmp_path):
    """`quiver serve MODEL.gguf --lora-modules a=P '{"name": "b", ...}' --adapter c=P`: the adapters are
    served, and converting the GGUF (transformers' tqdm bars) leaves no progress bar in the log."""
    adapter = str(tiny_lora_set[2]["lora_qv"])
    make_tiny_gguf(tmp_path / "tiny.gguf")
    port = free_port()
    proc = quiver_serve(str(tmp_path / "tiny.gguf"), "--port", str(port), "--max-model-len", "64",
                        "--num-kv-blocks", "16", "--lora-modules", f"a={adapter}",
                        f'{{"name": "b", "path": "{adapter}", "base_model_name": "tiny"}}', "--adapter", f"c={adapter}",
                        env={"QUIVER_CACHE": str(tmp_path / "cache")})  # an empty cache: the GGUF is converted
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert sorted(m["id"] for m in httpx.get(url + "/v1/models").json()["data"]) == ["a", "b", "c", "tiny"]
        assert httpx.get(url + "/v1/models/b").json()["parent"] == "tiny"
        err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "converting" in err and f"adapter a (lora) loaded from {adapter}: tier cpu" in err, err
    assert not re.search(r"\d+%\||it/s\]|s/it\]", err), err  # tqdm's bar and rate


def test_vllm_lora_page_as_printed(model_dir, tiny_lora_set):
    """vLLM's "LoRA Adapters" page, run as printed: its `vllm serve ... --enable-lora --lora-modules sql-lora=...`
    (our model and adapter in its paths, and a free port for its 8000) with VLLM_ALLOW_RUNTIME_LORA_UPDATING
    exported, from the folder holding the adapters; then its requests: /v1/models lists sql-lora, its completion,
    and loading and unloading an adapter at run time answer as vLLM's do."""
    adapters = tiny_lora_set[2]
    port = free_port()
    argv = as_quiver(VLLM_LORA_SERVE, model_dir, str(adapters["lora_qv"]))
    proc = quiver_serve(*argv[1:], "--port", str(port), env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
                        cwd=str(adapters["lora_qv"].parent))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert "sql-lora" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        done = httpx.post(url + "/v1/completions", json={"model": "sql-lora", "prompt": "San Francisco is a",
                                                         "max_tokens": 7, "temperature": 0}, timeout=60)
        assert done.status_code == 200 and done.json()["model"] == "sql-lora", done.text
        assert 1 <= done.json()["usage"]["completion_tokens"] <= 7
        load = httpx.post(url + "/v1/load_lora_adapter", timeout=60,
                          json={"lora_name": "sql_adapter", "lora_path": str(adapters["lora_r16_ko"])})
        assert (load.status_code, load.text) == (200, "Success: LoRA adapter 'sql_adapter' added successfully.")
        unload = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "sql_adapter"}, timeout=60)
        assert (unload.status_code, unload.text) == (200, "Success: LoRA adapter 'sql_adapter' removed successfully.")
        err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "--enable-lora: vLLM's flag, accepted; it changes nothing here: adapters are always on" in err, err


def test_the_model_answers_to_its_path_and_every_served_name(model_dir):
    """`quiver serve --served-model-name a b MODEL` (vLLM's list, which here also takes the model argument
    after it): /v1/models lists a and b, responses carry a, the path as typed and its absolute form name the
    base too, an unknown model lists what there is; and the start-up log states the dtype and what it means."""
    parent = Path(model_dir).parent
    port = free_port()
    proc = subprocess.Popen([QUIVER, "serve", "--port", str(port), "--dtype", "float32", "--served-model-name", "a",
                             "b", f"{parent.name}/tiny"], cwd=parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [(c["id"], c["root"], c["dtype"]) for c in cards] == [("a", "a", "float32"), ("b", "a", "float32")]
        for name in ("a", "b", f"{parent.name}/tiny", model_dir):
            r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": [3, 4], "max_tokens": 1}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == "a", (name, r.text)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [3, 4]}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert r.json()["error"]["message"] == "model 'tiny' does not exist; available: a, b"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "dtype float32 (--dtype float32): outputs match float32 references (transformers, PEFT) and do not " \
           "depend on batch composition" in err, err


def test_port_in_use_is_one_line_before_the_model_loads(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refusal("--model", model_dir, "--port", str(port))
    assert line == f"quiver serve: error: --host 127.0.0.1 --port {port}: cannot listen there: " \
                   "the address is already in use"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal a machine without CUDA gives")
def test_cuda_device_without_cuda_is_one_line(model_dir):
    line = refusal("--model", model_dir, "--port", str(free_port()), "--device", "cuda")
    assert line.startswith("quiver serve: error: --device cuda: this torch sees no CUDA device"), line


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
