"""llama.cpp's llama-server as the low-load peer (bench lowload --llama-server): start it as
../shared/research/llamacpp-peer.md does, on loopback, with the LoRA (if any) loaded at scale 0 and applied per
request, and time one request at a time over HTTP.

Time per output token = (time of an N-token request - time of a 1-token request) / (N - 1), the research note's
definition: both requests prefill the same prompt (cache_prompt off), so the difference is N - 1 decode steps.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def server_command(binary: str | Path, gguf: str | Path, lora: str | Path | None, threads: int, port: int,
                   ctx: int = 4096) -> list[str]:
    """llama-server's argv: one slot (-np 1: one request at a time), `threads` for decode and prompt alike; a LoRA
    loaded at scale 0 (`--lora-init-without-apply` alone still applies it to requests that name none), so each
    request says its scale."""
    cmd = [str(binary), "-m", str(gguf), "-np", "1", "-c", str(ctx), "-t", str(threads), "-tb", str(threads),
           "--host", "127.0.0.1", "--port", str(port)]
    if lora is not None:
        cmd += ["--lora-scaled", f"{lora}:0", "--lora-init-without-apply"]
    return cmd


def request_body(ids: list[int], n: int, lora_scale: float | None) -> dict:
    """A greedy /completion of exactly n tokens from token ids, the prompt computed afresh; with a LoRA loaded, its
    scale (0: the base)."""
    body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": False,
            "stream": False}
    if lora_scale is not None:
        body["lora"] = [{"id": 0, "scale": lora_scale}]
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server running for the with-block; its log in a temporary file, its tail in any start-up error."""

    def __init__(self, binary, gguf, lora=None, threads: int = 1, start_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lora = lora
        self.cmd = server_command(binary, gguf, lora, threads, self.port)
        self.start_timeout = start_timeout

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        env = dict(os.environ)  # a build loads its shared libraries from beside the binary (build/bin)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(Path(self.cmd[0]).resolve().parent),
                                                                 env.get("LD_LIBRARY_PATH")]))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server did not come up ({' '.join(self.cmd)}):\n{tail}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False  # not listening yet, or 503 while the model loads

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def complete(self, ids: list[int], n: int, lora_scale: float | None) -> tuple[float, dict]:
        """(seconds, the response) of one /completion."""
        data = json.dumps(request_body(ids, n, lora_scale)).encode()
        req = urllib.request.Request(f"{self.url}/completion", data=data, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return time.perf_counter() - t0, out

    def tpot_ms(self, prompts: list[list[int]], n: int, lora: bool) -> dict:
        """Median over the prompts of (t(n) - t(1)) / (n - 1), in ms, beside the server's own decode figure
        (timings.predicted_per_token_ms of the n-token responses)."""
        scale = (1.0 if lora else 0.0) if self.lora is not None else None
        self.complete(prompts[0], 4, scale)  # warm-up
        ours, theirs = [], []
        for ids in prompts:
            one, _ = self.complete(ids, 1, scale)
            many, out = self.complete(ids, n, scale)
            ours.append((many - one) / (n - 1) * 1000)
            if "predicted_per_token_ms" in out.get("timings", {}):
                theirs.append(out["timings"]["predicted_per_token_ms"])
        return {"tpot_ms": statistics.median(ours), "tpot_ms_all": ours,
                "server_predicted_per_token_ms": statistics.median(theirs) if theirs else None}
