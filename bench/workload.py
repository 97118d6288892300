"""The 8-adapter chat workload the CPU path is tuned on: 64 chat requests of 38-63 prompt tokens, 64
greedy new tokens each, request i on LoRA adapter i mod 8 (ranks 8 and 16 alternating, all seven
projections), all 64 in flight. Output tokens/s of the 8-adapter mix and of the same prompts on the
base model, for each dtype asked, each run in a fresh process with the same thread count.

With --baseline TREE the same runs also go through another checkout's engine (TREE/.venv, e.g. a
worktree of an earlier commit). Every engine and mix of a dtype is a resident process of its own, and
their rounds alternate, so a speed-up or the cost of LoRA rows is a ratio of neighbours in time, measured
in one run on one machine.

    quiver bench workload [--dtypes float32 auto] [--baseline TREE] [--repeats 3] [--threads N]
                          [--model DIR|SHAPE] [--requests 64] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADAPTERS = 8
PADDING = ["", " Keep it simple.", " Use plain words a child could follow, and give one example.",
           " Mention one surprising fact, explain why it matters, and end with a question for the reader to "
           "think about."]


def chat_prompts(tokenizer, round_: int, requests: int) -> list[list[int]]:
    """`requests` chat prompts; each round's differ (by a request number), so no round reuses another's KV."""
    from quiver.bench.throughput import TOPICS
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"({round_}.{i}) Write a short paragraph about {TOPICS[i % len(TOPICS)]}."
                                     + PADDING[i % len(PADDING)]}], add_generation_prompt=True, tokenize=False)
        for i in range(requests)]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def worker(spec: dict) -> None:
    """One engine, one dtype, in its own process (whichever checkout's python runs it): warms up, prints
    a ready line, then runs one round of the workload for each line it reads and prints its tokens/s.
    Uses only the engine API every version has: EngineConfig, LLMEngine, add_request, step."""
    import torch
    from transformers import AutoTokenizer

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.sampling import SamplingParams

    requests = spec["requests"]
    engine = LLMEngine(EngineConfig(model=spec["model"], dtype=spec["dtype"], num_threads=spec["threads"],
                                    max_loras=ADAPTERS, max_lora_rank=16, max_num_seqs=requests))
    for path in spec["adapters"]:
        engine.load_adapter(Path(path).name, path)
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    names = [Path(p).name for p in spec["adapters"]]

    def run(round_: int, new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(chat_prompts(tokenizer, round_, requests)):
            engine.add_request(ids, params, adapter=names[i % len(names)] if names else None)
        t0, produced = time.perf_counter(), 0
        while engine.has_work():
            produced += len(engine.step())
        assert produced == requests * new_tokens
        return produced / (time.perf_counter() - t0)

    run(0, 4)  # warm-up: every adapter in its slot, the allocator's pools filled
    print(json.dumps({"dtype": str(engine.runner.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}),
          flush=True)
    for round_, _ in enumerate(sys.stdin, start=1):
        print(json.dumps({"tokens_per_s": run(round_, spec["new_tokens"])}), flush=True)


def make_adapters(root: Path, model: str | None) -> list[str]:
    """ADAPTERS PEFT LoRA adapters on the model (None: the embedded one), ranks 8 and 16 alternating, all seven
    projections."""
    import torch
    from transformers import AutoModelForCausalLM

    from quiver.bench.adapters import make_adapters as make_loras
    from quiver.server.model.checkpoint import resolve_model

    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model)[0], dtype=torch.float32)
    return [str(p) for p in make_loras(hf, root, ADAPTERS, (8, 16))]


class Worker:
    """A worker process of `python` (this file run by path: a baseline's python imports its own quiver)."""

    def __init__(self, python: str, spec: dict):
        self.proc = subprocess.Popen([python, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:  # the worker's JSON lines, past anything a library printed
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"workload worker exited with {self.proc.wait()}")

    def round(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()["tokens_per_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> dict:
    from quiver.bench.common import add_out_arg, machine, write_json
    from quiver.bench.models import MODEL_HELP, bench_model

    ap = argparse.ArgumentParser(prog="quiver bench workload")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "auto"])
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout with its own .venv")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the workload per engine (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--requests", type=int, default=64, help="chat requests per round, all in flight")
    ap.add_argument("--new-tokens", type=int, default=64)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    engines = {"quiver": sys.executable}
    if args.baseline:
        engines["baseline"] = str(args.baseline.resolve() / ".venv" / "bin" / "python")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.model = bench_model(args.model, tmp)
        paths = make_adapters(Path(tmp), args.model)
        for dtype in args.dtypes:
            # one process per engine and mix, all resident; their rounds alternate, so every figure of a
            # dtype is measured side by side in time with the others (the machine's load drifts over minutes)
            spec = {"dtype": dtype, "threads": args.threads, "model": args.model, "requests": args.requests,
                    "new_tokens": args.new_tokens}
            workers = {(engine, mix): Worker(python, spec | {"adapters": adapters})
                       for mix, adapters in (("8 LoRA adapters", paths), ("base only", []))
                       for engine, python in engines.items()}
            rates = {key: [] for key in workers}
            for _ in range(args.repeats):
                for key, w in workers.items():
                    rates[key].append(w.round())
            for (engine, mix), w in workers.items():
                w.close()
                got = rates[engine, mix]
                row = {"engine": engine, "mix": mix, "dtype_asked": dtype, **w.info, "tokens_per_s": got,
                       "median_tokens_per_s": statistics.median(got)}
                rows.append(row)
                print(f"{engine:9s} {mix:16s} --dtype {dtype:8s} ({row['dtype']}, {row['threads']} threads): "
                      f"{row['median_tokens_per_s']:6.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in got)})",
                      flush=True)
    result = {"benchmark": "workload", "requests": args.requests, "new_tokens": args.new_tokens, "adapters": ADAPTERS,
              "baseline": str(args.baseline) if args.baseline else None, "machine": machine(), "rows": rows}
    median = {(r["engine"], r["mix"], r["dtype_asked"]): r["median_tokens_per_s"] for r in rows}
    reference = median.get(("baseline", "8 LoRA adapters", "float32"))  # "today's fp32 figure"
    for r in rows:
        r["vs_base_only"] = r["median_tokens_per_s"] / median[r["engine"], "base only", r["dtype_asked"]]
        r["vs_baseline_float32_lora"] = r["median_tokens_per_s"] / reference if reference else None
    for r in rows:
        line = f"{r['engine']:9s} {r['mix']:16s} {r['dtype']:9s} LoRA/base {r['vs_base_only']:.2f}"
        if r["vs_baseline_float32_lora"]:
            line += f"   vs baseline fp32 8-adapter {r['vs_baseline_float32_lora']:.2f}x"
        print(line)
    print("wrote", write_json("workload", result, args.out))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        main()
