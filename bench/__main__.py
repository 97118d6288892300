"""python -m quiver.bench <name> [...] (or quiver bench <name> [...]): run one benchmark."""
from __future__ import annotations

import importlib
import sys
import time

from quiver.bench.common import RESULTS, quiet_third_party

# name: (what it measures, its run time with its defaults on a 2-core CPU, SmolLM2-135M in float32)
BENCHMARKS = {
    "latency": ("merged vs unmerged vs base: TTFT and time per output token at 1, 8, 32 concurrent", "11 min"),
    "adapters": ("throughput against the number of distinct LoRA adapters in a batch", "7 min"),
    "peft": ("the multi-adapter workloads through PEFT (per-adapter and mixed-batch generate)", "3 min"),
    "serving": ("HTTP load generator: Poisson arrivals over uniform or Zipf-drawn adapters", "1.5 min"),
    "throughput": ("tokens/s against transformers' generate at several concurrency levels", "1.5 min"),
    "families": ("decode throughput of each adapter family against the base model", "3 min"),
    "archs": ("decode tok/s of each supported architecture's small random shape, Quiver against transformers",
              "1 min"),
    "hotload": ("from POST /v1/adapters to the first token of the new adapter", "1 min"),
    "mixed": ("engine step times on decode rows with long prompts prefilling in the same steps", "1 min"),
    "attention": ("attention for mixed prefill + decode steps: planned groups vs padded vs SDPA per row", "1 min"),
    "kernels": ("the Triton kernels against the torch ops and a per-adapter loop: us and GB/s", None),
    "gpu_check": ("make gpu-check: every CUDA test and the key benchmarks in one pass, one JSON", None),
    "load": ("sustained closed-loop streaming load over mixed adapter families, with leak and output checks",
             "5 min"),
    "grammar": ("the grammar engines (llguidance, xgrammar): compile, mask fill, schema coverage", "10 s"),
    "sampling": ("per-step cost of penalties, logit_bias and structured output at batch 32, against plain", "3 min"),
    "quantized": ("the base kept 4-bit (NF4) against full precision: weight memory, decode at batch 1/8/32",
                  "3 min"),
    "prefix": ("prefix caching: time to first token of chats sharing a long system prompt, cache on and off",
               "1.5 min"),
    "roofline": ("achieved GFLOP/s of decode and prefill steps against the measured matmul peak", "1 min"),
    "workload": ("the 8-adapter chat workload: LoRA vs base-only tok/s per dtype, against a baseline checkout",
                 "6 min"),
    "lowload": ("time per output token at batch 1/2/4/8, base and one LoRA, against the memory-bandwidth floor "
                "(and llama-server's with --llama-server)", "3 min"),
    "speculative": ("n-gram speculative decoding at batch 1 on a repeat-this-text task: tok/s on vs off, "
                    "acceptance, identical outputs", "2 min"),
    "ray_hop": ("latency the Ray Serve ingress adds per request: quiver ray serve against quiver serve", "4 min"),
}


def run_time(name: str) -> str:
    minutes = BENCHMARKS[name][1]
    return f"about {minutes} on 2 cores" if minutes else "needs a CUDA GPU"


def listing() -> str:
    rows = "\n".join(f"  {name:11s} {run_time(name):25s} {what}" for name, (what, _) in BENCHMARKS.items())
    return (f"usage: quiver bench NAME [options]   (quiver bench NAME --help: its options)\n\n"
            f"Each benchmark prints a table and writes NAME.json (most a PNG too) to ./{RESULTS}/ in the current\n"
            f"directory, or to --out DIR; --out bench/results rewrites the published figures of docs/benchmarks.md.\n"
            f"Run times are for the defaults on a 2-core CPU.\n\n{rows}\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(listing(), end="")
        return
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"quiver bench: error: no benchmark named {name!r}\n\n{listing()}", end="", file=sys.stderr)
        sys.exit(2)
    if "-h" in rest or "--help" in rest:
        print(f"quiver bench {name}: {BENCHMARKS[name][0]} ({run_time(name)} with the defaults)\n")
    else:
        quiet_third_party()
    start = time.monotonic()
    importlib.import_module(f"quiver.bench.{name}").main(rest)
    print(f"quiver bench {name}: done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
