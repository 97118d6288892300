"""make gpu-check: everything a lent GPU should run, in one prepared pass of under 8 minutes, into one JSON.

  1. every CUDA test: the Triton kernels against their references (fp32/bf16/fp16, head sizes 64 and 128,
     ranks 1-128), the kernels compiled for sm_80/89/90, the device harness, and the engine on the GPU
     against PEFT for every family in one mixed batch, float32 and bfloat16;
  2. the kernel benchmark: Triton against the torch ops and a per-adapter loop, microseconds and GB/s;
  3. decode tokens/s in bf16 at batch 1, 8 and 32 with 1, 8 and 32 adapters (against PEFT's mixed batch);
  4. merged against unmerged latency in bf16.

Steps 3 and 4 run on a random model in SmolLM2's shapes (bench.models: a GPU machine may have no
checkpoint and no network; speed depends on shapes alone). Each step has a time limit; the JSON records
each step's command, exit status, seconds and results.

    quiver bench gpu_check [--out DIR] [--shape smollm2-135m|llama-8b] [--skip-tests]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from quiver.bench.common import RESULTS, machine, write_json

CUDA_TESTS = ["tests/test_kernels_lora.py", "tests/test_kernels_attention.py", "tests/test_triton_compile.py",
              "tests/test_device_harness.py", "tests/test_gpu.py", "tests/test_qlora_gpu.py"]
ROOT = Path(__file__).resolve().parent.parent


def step(name: str, argv: list[str], seconds: int, out: Path) -> dict:
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    took = time.monotonic() - t0
    (out / f"{name}.log").write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    tail = (text if isinstance(text, str) else "").strip().splitlines()[-3:]
    print(f"{name:10s} rc={rc} {took:6.1f} s  {tail[-1] if tail else ''}", flush=True)
    return {"command": argv, "returncode": rc, "seconds": round(took, 1), "tail": tail}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench gpu_check")
    ap.add_argument("--out", default=None, help="folder for the JSON and the logs (default bench/results/gpu-check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="smollm2-135m", help="model shapes for the throughput steps (bench.models)")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / "gpu-check"
    out.mkdir(parents=True, exist_ok=True)
    from quiver.bench.models import random_model

    model = str(random_model(out / f"model-{args.shape}", args.shape))
    py = sys.executable
    bench = [py, "-m", "quiver.bench"]
    gpu = ["--device", args.device, "--dtype", "bfloat16", "--model", model]
    plan = []
    if not args.skip_tests:
        plan.append(("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *CUDA_TESTS], 240))
    plan += [
        ("kernels", [*bench, "kernels", "--device", args.device, "--out", str(out / "kernels")], 60),
        ("batch1", [*bench, "adapters", *gpu, "--batch", "1", "--adapters", "1", "--new-tokens", "32",
                    "--out", str(out / "batch1")], 60),
        ("batch8", [*bench, "adapters", *gpu, "--batch", "8", "--adapters", "1", "8", "--new-tokens", "32",
                    "--out", str(out / "batch8")], 60),
        ("batch32", [*bench, "adapters", *gpu, "--batch", "32", "--adapters", "1", "8", "32", "--new-tokens", "32",
                     "--out", str(out / "batch32")], 90),
        ("latency", [*bench, "latency", *gpu, "--concurrency", "1", "8", "32", "--repeats", "1",
                     "--out", str(out / "latency")], 90),
        ("quantized", [*bench, "quantized", *gpu, "--rounds", "1", "--out", str(out / "quantized")], 90),
    ]
    result = {"machine": machine(), "steps": {}}
    for name, command, seconds in plan:
        result["steps"][name] = step(name, command, seconds, out)
        for found in sorted((out / name).glob("*.json")) if (out / name).is_dir() else []:
            result["steps"][name]["results"] = json.loads(found.read_text())
    result["passed"] = all(s["returncode"] == 0 for s in result["steps"].values())
    path = write_json("gpu-check", result, out)
    print(f"wrote {path}: {'all steps passed' if result['passed'] else 'SOME STEPS FAILED'}")
    return result


if __name__ == "__main__":
    main()
