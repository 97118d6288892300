"""Hot-load latency: from POST /v1/adapters to the first token of a request that uses the new
adapter, against a running `quiver serve`, for a LoRA (r=16, all seven projections) and a
prefix adapter; median and max of several loads, each under a fresh name.

    quiver bench hotload [--repeats 5] [--model DIR]
                         [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quiver.bench.common import add_device_args, add_out_arg, dtype_name, machine, release, write_json

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, root: Path, rank: int, virtual: int, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    lora = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=rank, target_modules=ALL7))
    lora.save_pretrained(root / "lora")
    lora.unload()
    prefix = get_peft_model(hf, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual))
    prefix.save_pretrained(root / "prefix")
    del hf, lora, prefix
    release(device)  # before the server loads its own copy
    return {"lora": root / "lora", "prefix": root / "prefix"}


def first_token_after_load(client, url: str, name: str, path: Path) -> float:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/adapters", json={"name": name, "path": str(path)})
    r.raise_for_status()
    with client.stream("POST", f"{url}/v1/completions", json={
            "model": name, "prompt": "Hello", "max_tokens": 4, "stream": True}) as s:
        lines = s.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                elapsed = time.perf_counter() - t0
                break
        for _ in lines:  # let it finish, so the adapter can be unloaded
            pass
    client.delete(f"{url}/v1/adapters/{name}").raise_for_status()
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench hotload")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--port", type=int, default=8766)
    add_device_args(ap)  # of the started `quiver serve`, and of the model the adapters are made from
    add_out_arg(ap)
    args = ap.parse_args(argv)

    import httpx

    from quiver.server.engine.device import resolve_dtype
    from quiver.server.model.checkpoint import resolve_model

    model_dir, model_name = resolve_model(args.model)
    dtype = resolve_dtype(args.dtype, torch.device(args.device), model_dir)
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_adapters(model_dir, root, args.rank, args.virtual_tokens, args.device, dtype)
        cmd = [str(Path(sys.executable).parent / "quiver"), "serve", "--port", str(args.port), "--log-level",
               "WARNING", "--adapter-root", str(root), "--max-lora-rank", str(args.rank),
               "--device", args.device, "--dtype", args.dtype]
        if args.model:
            cmd += ["--model", str(args.model)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with httpx.Client(timeout=120) as client:
                for _ in range(600):
                    try:
                        if client.get(f"{url}/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                client.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 2}).raise_for_status()
                rows = []
                for kind, path in paths.items():
                    times = [first_token_after_load(client, url, f"{kind}{i}", path) for i in range(args.repeats)]
                    rows.append({"adapter": kind, "median_ms": 1000 * statistics.median(times),
                                 "max_ms": 1000 * max(times), "all_ms": [1000 * t for t in times]})
                    print(f"{kind:7s} POST -> first token: median {rows[-1]['median_ms']:.0f} ms, "
                          f"max {rows[-1]['max_ms']:.0f} ms over {args.repeats}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"benchmark": "hotload", "model": model_name, "device": args.device, "dtype": dtype_name(dtype),
              "rank": args.rank, "virtual_tokens": args.virtual_tokens,
              "repeats": args.repeats, "machine": machine(), "rows": rows}
    print("wrote", write_json("hotload", result, args.out))
    return result
