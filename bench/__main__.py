"""python -m quiver.bench <name> [...] (or quiver bench <name> [...]): run one benchmark."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"latency": "merged vs unmerged vs base: TTFT and time per output token at 1, 8, 32 concurrent",
              "adapters": "throughput against the number of distinct LoRA adapters in a batch",
              "peft": "the multi-adapter workloads through PEFT (per-adapter and mixed-batch generate)",
              "serving": "HTTP load generator: Poisson arrivals over uniform or Zipf-drawn adapters",
              "throughput": "tokens/s against transformers' generate at several concurrency levels",
              "families": "decode throughput of each adapter family against the base model",
              "hotload": "from POST /v1/adapters to the first token of the new adapter",
              "mixed": "engine step times on decode rows with long prompts prefilling in the same steps",
              "attention": "attention for mixed prefill + decode steps: planned groups vs padded vs SDPA per row",
              "kernels": "the Triton kernels against the torch ops and a per-adapter loop on a GPU: us and GB/s",
              "gpu_check": "make gpu-check: every CUDA test and the key benchmarks in one pass, one JSON",
              "load": "sustained closed-loop streaming load over mixed adapter families, with leak and output checks",
              "grammar": "the grammar engines (llguidance, xgrammar): compile, mask fill, schema coverage",
              "sampling": "per-step cost of penalties, logit_bias and structured output at batch 32, against plain",
              "quantized": "the base kept 4-bit (NF4) against full precision: weight memory, decode at batch 1/8/32",
              "prefix": "prefix caching: time to first token of chats sharing a long system prompt, cache on and off",
              "roofline": "achieved GFLOP/s of decode and prefill steps against the measured matmul peak",
              "workload": "the 8-adapter chat workload: LoRA vs base-only tok/s per dtype, against a baseline checkout",
              "ray_hop": "latency the Ray Serve ingress adds per request: quiver ray serve against quiver serve"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        lines = "\n".join(f"  {name:11s} {what}" for name, what in BENCHMARKS.items())
        sys.exit(f"usage: quiver bench NAME [options]   (NAME --help for its options)\n{lines}")
    importlib.import_module(f"quiver.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
