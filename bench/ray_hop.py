"""What the Ray Serve ingress hop costs a request: the same requests against `quiver serve` and against
`quiver ray serve --replicas 1` with the same flags and adapters, both up at once, rounds alternated.

Per round and server: sequential one-token requests (latency: the hop's fixed cost stands out), sequential
streamed requests (time to first token, time per output token), and concurrent streamed clients
(output tokens/s). Each figure is the median over rounds of the round's median.

With --replicas 2 it also reports routing: the share of each adapter's sequential requests served by
the replica that serves most of them (affinity), and how a burst of 2 x --max-num-seqs concurrent
requests for one adapter splits over the replicas (spill).

    quiver bench ray_hop [--model DIR] [--adapters 4] [--rounds 3] [--requests 30] [--max-tokens 32]
                         [--clients 8] [--dtype float32] [--threads 2] [--replicas 1] [--max-num-seqs N]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from quiver.bench.common import add_out_arg, machine, write_json
from quiver.bench.serving import wait_healthy

PROMPT = "Write one sentence about the sea, the sky and a small boat."


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, args, adapter_dir: Path, port: int, log: Path) -> subprocess.Popen:
    quiver = str(Path(sys.executable).parent / "quiver")
    cmd = [quiver, *(["serve"] if kind == "single" else ["ray", "serve", "--replicas", str(args.replicas),
                                                         "--num-cpus-per-replica", "0"]),
           "--port", str(port), "--log-level", "WARNING", "--dtype", args.dtype, "--num-threads", str(args.threads),
           "--adapter-dir", str(adapter_dir), "--max-lora-rank", "16"]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)


def one_token(client, url: str, adapter: str, served: Counter | None = None) -> float:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json={"model": adapter, "prompt": PROMPT, "max_tokens": 1,
                                                   "temperature": 0})
    r.raise_for_status()
    if served is not None:
        served[adapter, r.headers.get("x-quiver-replica", "").split(" ")[0]] += 1
    return (time.perf_counter() - t0) * 1000


def routing(url: str, adapters: list[str], args) -> dict:
    """Affinity of sequential requests, and the spill of a burst for one adapter, on a Ray app."""
    import httpx

    served: Counter = Counter()
    with httpx.Client(timeout=600) as c:
        for i in range(args.requests):
            one_token(c, url, adapters[i % len(adapters)], served)
    per_adapter = {a: [n for (b, _), n in served.items() if b == a] for a in adapters}
    burst: Counter = Counter()
    hot = adapters[0]
    count = 2 * (args.max_num_seqs or 64)

    def send(_):
        with httpx.Client(timeout=600) as c:
            r = c.post(f"{url}/v1/completions", json={"model": hot, "prompt": PROMPT, "max_tokens": args.max_tokens,
                                                      "temperature": 0, "ignore_eos": True})
            burst[r.headers.get("x-quiver-replica", "").split(" ")[0]] += 1

    threads = [threading.Thread(target=send, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sequential_on_main_replica": {a: max(ns) / sum(ns) for a, ns in per_adapter.items()},
            "replicas_used_by_sequential": len({r for _, r in served}),
            "burst_requests": count, "burst_split": sorted(burst.values(), reverse=True)}


def streamed(client, url: str, adapter: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token ms, time per output token after it ms, tokens) of one streamed request."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"model": adapter, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                tokens += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return (first - t0) * 1000, (end - first) * 1000 / max(tokens - 1, 1), tokens


def concurrent(url: str, adapters: list[str], clients: int, max_tokens: int) -> float:
    """Output tokens/s of `clients` streamed requests at once, two each, over the adapters."""
    import httpx

    counts = [0] * clients

    def run(k):
        with httpx.Client(timeout=600) as c:
            for j in range(2):
                counts[k] += streamed(c, url, adapters[(k + j) % len(adapters)], max_tokens)[2]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def measure(url: str, adapters: list[str], args) -> dict:
    import httpx

    with httpx.Client(timeout=600) as c:
        one = [one_token(c, url, adapters[i % len(adapters)]) for i in range(args.requests)]
        runs = [streamed(c, url, adapters[i % len(adapters)], args.max_tokens) for i in range(args.requests // 3)]
    return {"one_token_ms": statistics.median(one), "ttft_ms": statistics.median(r[0] for r in runs),
            "tpot_ms": statistics.median(r[1] for r in runs),
            "concurrent_tok_s": concurrent(url, adapters, args.clients, args.max_tokens)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench ray_hop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=30, help="sequential one-token requests per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1, help="replicas of the Ray app (2: also measure routing)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="both servers' batch capacity (Ray's spill point)")
    add_out_arg(ap)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from quiver.bench.adapters import make_adapters
    from quiver.server.model.checkpoint import resolve_model

    work = Path(tempfile.mkdtemp(prefix="quiver-rayhop-"))
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model)[0], dtype=torch.float32)
    adapters = [p.name for p in make_adapters(hf, work / "adapters", args.adapters, (8, 16))]
    del hf
    servers, procs = {}, []
    try:
        for kind in ("single", "ray"):
            port = _port()
            procs.append(start(kind, args, work / "adapters", port, work / f"{kind}.log"))
            servers[kind] = f"http://127.0.0.1:{port}"
        for proc, (kind, url) in zip(procs, servers.items()):
            wait_healthy(proc, url, work / f"{kind}.log")
            measure(url, adapters, argparse.Namespace(**{**vars(args), "requests": 3, "clients": 2}))  # warm-up
        rounds: dict[str, list[dict]] = {kind: [] for kind in servers}
        for r in range(args.rounds):
            for kind in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                rounds[kind].append(measure(servers[kind], adapters, args))
                print(f"round {r + 1} {kind}: {json.dumps(rounds[kind][-1])}", flush=True)
        routed = routing(servers["ray"], adapters, args) if args.replicas > 1 else None
    finally:  # SIGTERM: quiver ray serve shuts Serve and Ray down; whatever is left of either goes after
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    summary = {kind: {key: statistics.median(x[key] for x in runs) for key in runs[0]} for kind, runs in rounds.items()}
    added = {key: summary["ray"][key] - summary["single"][key] for key in summary["single"]}
    ratio = {key: summary["ray"][key] / summary["single"][key] for key in summary["single"]}
    result = {"bench": "ray_hop", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "single": summary["single"], "ray": summary["ray"], "ray_minus_single": added, "ray_over_single": ratio,
              "routing": routed, "rounds": rounds}
    print(json.dumps({"single": summary["single"], "ray": summary["ray"], "ray_minus_single": added,
                      "routing": routed}, indent=2))
    name = "ray_hop" if args.replicas == 1 else f"ray_hop_{args.replicas}replicas"
    print(f"written to {write_json(name, result, args.out)}")
    return result


if __name__ == "__main__":
    main()
