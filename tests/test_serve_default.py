"""`quiver serve` with no --model: the embedded SmolLM2, as `make serve` runs it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    quiver = Path(sys.executable).parent / "quiver"
    return subprocess.Popen([str(quiver), "serve", "--port", str(port), "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no /health within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_default_model_says_paris_and_restarts_fast(smollm2_dir):
    # smollm2_dir has already converted the GGUF, as the first `make serve` does
    port = _free_port()
    proc = _start(port)
    try:
        _wait_healthy(proc, port, timeout=120)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
        assert "Paris" in r.json()["choices"][0]["text"]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == "SmolLM2-135M-Instruct"
    finally:
        _stop(proc)
    proc = _start(port)
    try:
        assert _wait_healthy(proc, port, timeout=15) <= 15
    finally:
        _stop(proc)
