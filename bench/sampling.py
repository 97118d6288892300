"""What the request fields that change sampling cost per decode step, at batch 32, against plain decoding.

Every configuration runs the same 32 rows (prompts of --prompt-tokens, --new-tokens decoded) through the
real engine (SmolLM2 by default); the configurations alternate in rounds, each round starting one
further on, so drift and warm-up hit all of them alike. Reported: the median decode-step time of each, and its ratio to plain greedy decoding.

  plain       greedy
  random      temperature 1, top_p 0.9, seeded
  penalties   presence 0.5, frequency 0.5, repetition 1.2 (prompt and output tokens counted every step)
  bias        logit_bias on 50 tokens, min_tokens, two bad words
  grammar     a JSON schema on every row (llguidance mask fill + apply)
  all         all of the above on every row, sampled

    quiver bench sampling [--rows 32] [--rounds 3] [--model DIR] [--threads N] [--device ...] [--dtype ...]
"""
from __future__ import annotations

import argparse
import statistics


from quiver.bench.common import add_device_args, add_out_arg, decode_step_ms, dtype_name, machine, write_json

# an array that cannot close within the measured steps, so every row keeps decoding under its grammar
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 256}


def configs(engine) -> dict:
    from quiver.server.engine.grammar import json_spec
    from quiver.server.engine.sampling import SamplingParams

    grammar = engine.grammars.compile(json_spec(SCHEMA, "bench"))
    bias = dict(logit_bias={100 + 7 * i: 1.5 for i in range(50)}, min_tokens=8, bad_words_ids=[[1000, 1001], [2000]])
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
    random = dict(temperature=1.0, top_p=0.9)
    return {"plain": {}, "random": random, "penalties": penalties, "bias": bias, "grammar": dict(grammar=grammar),
            "all": {**random, **penalties, **bias, "grammar": grammar}}, SamplingParams


def run(engine, fields: dict, params_cls, rows: int, prompt_tokens: int, new_tokens: int, seed: int) -> list[float]:
    return decode_step_ms(engine, rows, prompt_tokens, lambda i: params_cls(
        **{"temperature": 0, **fields, "max_tokens": new_tokens, "seed": i, "ignore_eos": True}), seed)


def main(argv: list[str] | None = None) -> dict:
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    ap = argparse.ArgumentParser(prog="quiver bench sampling")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, device=args.device, dtype=args.dtype))
    table, params_cls = configs(engine)
    steps: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further on
            steps[name] += run(engine, table[name], params_cls, args.rows, args.prompt_tokens, args.new_tokens,
                               seed=r)
    medians = {name: statistics.median(v) for name, v in steps.items()}
    result = {"machine": machine(), "device": args.device, "dtype": dtype_name(engine.dtype),
              "rows": args.rows, "prompt_tokens": args.prompt_tokens,
              "configs": {name: {"decode_step_ms_median": medians[name], "vs_plain": medians[name] / medians["plain"],
                                 "steps": len(steps[name])} for name in table}}
    for name, row in result["configs"].items():
        print(f"{name:10s} decode step {row['decode_step_ms_median']:7.1f} ms   {row['vs_plain']:.3f}x plain")
    path = write_json("sampling", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
