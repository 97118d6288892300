"""Output tokens/s at several concurrency levels: Quiver's engine against transformers'
batched `generate` on the same prompts, in one process and one run, on one device in one dtype, plus
the peak RSS of a `quiver serve` process under the largest load (on the CPU; on a GPU, where the
weights and the KV cache are not in the RSS, its HTTP throughput only).

    quiver bench throughput [--concurrency 1 4 16 32] [--new-tokens 64] [--threads N]
                            [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import torch

from quiver.bench.common import (add_device_args, add_out_arg, cuda_peak, dtype_name, is_cuda, machine, release,
                                 synchronize, write_json)

TOPICS = ["the history of Rome", "how rain forms", "a recipe for bread", "the rules of chess", "black holes",
          "the French revolution", "photosynthesis", "learning a language", "the moon landing", "volcanoes",
          "bees and flowers", "the printing press", "ocean tides", "a trip to Japan", "electric cars",
          "the Roman alphabet", "jazz music", "desert animals", "the water cycle", "ancient Egypt",
          "quantum computers", "mountain climbing", "the human heart", "coffee", "the internet",
          "glaciers", "the violin", "city gardens", "the Olympic games", "clouds", "lighthouses", "honey"]


def prompts(n: int) -> list[str]:
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def run_quiver(engine, tokenizer, texts, new_tokens: int, adapters: list[str | None] | None = None) -> float:
    from quiver.server.engine.sampling import SamplingParams
    for i, t in enumerate(texts):
        engine.add_request(tokenizer(t).input_ids, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                  ignore_eos=True),
                           adapter=adapters[i] if adapters else None)
    t0 = time.perf_counter()
    produced = 0
    while engine.has_work():
        produced += len(engine.step())
    elapsed = time.perf_counter() - t0
    assert produced == len(texts) * new_tokens
    return produced / elapsed


def run_transformers(model, tokenizer, texts, new_tokens: int, **generate_kw) -> float:
    """Batched greedy `generate` (PEFT models too: pass adapter_names for a mixed batch)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    synchronize(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **generate_kw)
    synchronize(model.device)
    elapsed = time.perf_counter() - t0
    produced = (out.shape[1] - batch.input_ids.shape[1]) * len(texts)
    assert produced == len(texts) * new_tokens
    return produced / elapsed


def server_peak_rss(concurrency: int, new_tokens: int, threads: int | None, device: str = "cpu",
                    dtype: str = "auto") -> dict:
    """Start `quiver serve` on `device` in `dtype`, other flags default, load it with `concurrency` requests,
    report its peak RSS (on the CPU: on a GPU the RSS leaves out the weights and the KV cache, so it is not
    reported) and its HTTP throughput."""
    import httpx
    import psutil

    port = 8765
    cmd = [str(Path(sys.executable).parent / "quiver"), "serve", "--port", str(port), "--log-level", "WARNING",
           "--device", device, "--dtype", dtype]
    if threads:
        cmd += ["--num-threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        idle_rss = ps.memory_info().rss
        peak = idle_rss

        async def load():
            nonlocal peak
            async with httpx.AsyncClient(timeout=600) as client:
                reqs = [client.post(f"http://127.0.0.1:{port}/v1/completions",
                                    json={"prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
                        for p in prompts(concurrency)]
                task = asyncio.gather(*reqs)
                t0 = time.perf_counter()
                while not task.done():
                    peak = max(peak, ps.memory_info().rss)
                    await asyncio.sleep(0.05)
                results = await task
                elapsed = time.perf_counter() - t0
            assert all(r.status_code == 200 for r in results)
            return sum(r.json()["usage"]["completion_tokens"] for r in results) / elapsed

        tps = asyncio.run(load())
        if is_cuda(device):
            return {"device": device, "http_tokens_per_s": tps,
                    "note": "RSS not reported on CUDA: the weights and the KV cache live in GPU memory"}
        return {"device": device, "idle_rss_mib": idle_rss / 2**20, "peak_rss_mib": peak / 2**20,
                "http_tokens_per_s": tps}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench throughput")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: all cores)")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    add_device_args(ap)  # for both engines and the `quiver serve` measured
    ap.add_argument("--no-server", action="store_true", help="skip the `quiver serve` measurement")
    add_out_arg(ap)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, device=args.device,
                                    dtype=args.dtype))
    threads = torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(args.device).eval()
    run_quiver(engine, tokenizer, prompts(2), 4)  # warm-up both
    run_transformers(hf, tokenizer, prompts(2), 4)
    rows = []
    for c in args.concurrency:
        texts = prompts(c)
        q = run_quiver(engine, tokenizer, texts, args.new_tokens)
        h = run_transformers(hf, tokenizer, texts, args.new_tokens)
        rows.append({"concurrency": c, "quiver_tokens_per_s": q, "transformers_tokens_per_s": h, "ratio": q / h})
        print(f"concurrency {c:3d}: quiver {q:8.1f} tok/s   transformers {h:8.1f} tok/s   ratio {q / h:5.2f}x",
              flush=True)
    result = {"benchmark": "throughput", "model": engine.model_name, "device": args.device,
              "dtype": dtype_name(engine.dtype), "threads": threads,
              "new_tokens": args.new_tokens, "machine": machine(), **cuda_peak(engine.device), "rows": rows}
    if not args.no_server:
        del hf, engine
        release(args.device)  # the server is another process: leave it the device
        result["server"] = server_peak_rss(max(args.concurrency), args.new_tokens, args.threads, args.device,
                                           args.dtype)
        s = result["server"]
        memory = (f"peak RSS {s['peak_rss_mib']:.0f} MiB (idle {s['idle_rss_mib']:.0f} MiB), " if "peak_rss_mib" in s
                  else f"on {s['device']} (RSS not measured), ")
        print(f"quiver serve at {max(args.concurrency)} concurrent: {memory}{s['http_tokens_per_s']:.1f} tok/s "
              "over HTTP")
    print("wrote", write_json("throughput", result, args.out))
    return result
