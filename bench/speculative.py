"""Speculative decoding at batch 1 on a repetitive task: tokens/s with --speculative-config '{"method": "ngram",
"num_speculative_tokens": K}' (or, with --draft-model DIR, '{"model": DIR, "num_speculative_tokens": K}') against
the same engine without it, alternated, one request at a time, and whether the greedy outputs are identical.

The task: the model's chat template around "Repeat the following text exactly:" and a paragraph (one of
PARAGRAPHS per request, in turn), greedy, up to --max-tokens. float32 by default: a step that verifies K + 1
tokens rounds differently from a one-token step in bfloat16, so outputs are claimed identical in float32 only.
Decode tokens/s counts the tokens after the first over the time from the first to the last (the first comes
with the prefill); end to end counts every token from the request's arrival. Acceptance: accepted / drafted
tokens (RequestOutput.num_accepted_tokens / num_draft_tokens). Prefix caching is off in both engines, so every
request prefills its prompt.

    quiver bench speculative [--model DIR|SHAPE] [--draft-model DIR] [--k 4] [--repeats 2] [--max-tokens 192]
                             [--threads N] [--dtype float32|bfloat16|auto]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from quiver.bench.common import add_device_args, add_out_arg, dtype_name, machine, synchronize, write_json
from quiver.bench.models import MODEL_HELP, bench_model

PARAGRAPHS = [
    "The lighthouse stood on a rock a mile from the shore. Every evening the keeper climbed the one hundred and "
    "twelve steps, trimmed the wick, wound the clockwork that turned the lens, and wrote the weather in a book. "
    "Ships passed in the dark and never knew his name, but they knew his light.",
    "To make bread, mix flour, water, salt and yeast into a rough dough. Knead it for ten minutes until it is "
    "smooth, then leave it covered in a warm place for an hour. Shape it into a loaf, let it rise again, and bake "
    "it in a hot oven until the crust is brown and the bottom sounds hollow when tapped.",
    "Bees visit flowers to collect nectar and pollen. As they move from one flower to the next, pollen sticks to "
    "their bodies and is carried along, which lets the plants make seeds. A single hive can visit millions of "
    "flowers in a season, and the honey it stores is what carries the colony through the winter.",
]


def task_ids(tokenizer, paragraph: str) -> list[int]:
    messages = [{"role": "user", "content": f"Repeat the following text exactly:\n\n{paragraph}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def generate(engine, ids: list[int], max_tokens: int) -> dict:
    """One greedy request alone: its tokens, end-to-end and decode-phase seconds, drafted and accepted tokens."""
    from quiver.server.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    tokens, stamps, drafted, accepted = [], [], 0, 0
    while engine.has_work():
        outs = engine.step()
        synchronize(engine.device)
        now = time.perf_counter()
        for out in outs:
            if out.new_token_ids:
                stamps.append((now, len(tokens), len(out.new_token_ids)))
            tokens += out.new_token_ids
            drafted += out.num_draft_tokens
            accepted += out.num_accepted_tokens
    first_time, _, first_n = stamps[0]
    return {"tokens": tokens, "seconds": stamps[-1][0] - t0, "decode_seconds": stamps[-1][0] - first_time,
            "decode_tokens": len(tokens) - first_n, "drafted": drafted, "accepted": accepted}


def rates(runs: list[dict]) -> dict:
    e2e = [len(r["tokens"]) / r["seconds"] for r in runs]
    decode = [r["decode_tokens"] / r["decode_seconds"] for r in runs if r["decode_seconds"] > 0]
    drafted = sum(r["drafted"] for r in runs)
    return {"tokens_per_s": statistics.median(e2e), "decode_tokens_per_s": statistics.median(decode) if decode else None,
            "output_tokens": [len(r["tokens"]) for r in runs], "drafted": drafted,
            "accepted": sum(r["accepted"] for r in runs),
            "acceptance_rate": sum(r["accepted"] for r in runs) / drafted if drafted else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench speculative")
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--draft-model", default=None, help="a draft model's folder (same tokenizer): its drafts, not n-grams")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the paragraphs")
    ap.add_argument("--paragraphs", type=int, default=len(PARAGRAPHS), choices=range(1, len(PARAGRAPHS) + 1))
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    ap.set_defaults(dtype="float32")
    add_out_arg(ap)
    args = ap.parse_args(argv)

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    shapes = tempfile.TemporaryDirectory()  # a named shape's random model, for this run
    model = bench_model(args.model, shapes.name)
    spec = ({"method": "ngram", "num_speculative_tokens": args.k} if args.draft_model is None else
            {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": args.k})
    engines = {label: LLMEngine(EngineConfig(model=model, num_threads=args.threads, device=args.device,
                                             dtype=args.dtype, max_loras=0, enable_prefix_caching=False,
                                             speculative_config=config))
               for label, config in (("off", None), ("on", spec))}
    threads = torch.get_num_threads()
    tokenizer = engines["off"].tokenizer
    prompts = [task_ids(tokenizer, p) for p in PARAGRAPHS[:args.paragraphs]]
    for engine in engines.values():
        generate(engine, prompts[0], 8)  # warm-up
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    identical = True
    for rep in range(args.repeats):
        for i, ids in enumerate(prompts):
            order = ("off", "on") if (rep + i) % 2 == 0 else ("on", "off")
            got = {label: generate(engines[label], ids, args.max_tokens) for label in order}
            identical &= got["off"]["tokens"] == got["on"]["tokens"]
            for label in order:
                runs[label].append(got[label])
    off, on = rates(runs["off"]), rates(runs["on"])
    result = {"benchmark": "speculative", "model": engines["off"].model_name, "device": args.device,
              "dtype": dtype_name(engines["off"].dtype), "threads": threads, "speculative_config": spec,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "prompts": len(prompts),
              "prompt_tokens": [len(p) for p in prompts], "off": off, "on": on,
              "speedup": on["tokens_per_s"] / off["tokens_per_s"],
              "decode_speedup": (on["decode_tokens_per_s"] / off["decode_tokens_per_s"]
                                 if on["decode_tokens_per_s"] and off["decode_tokens_per_s"] else None),
              "identical_outputs": identical, "machine": machine(),
              "sample_output": tokenizer.decode(runs["on"][0]["tokens"])[:300]}
    rate = on["acceptance_rate"]
    for label, r in (("off", off), ("on", on)):
        print(f"speculation {label:3s}: {r['tokens_per_s']:6.1f} tok/s end to end, "
              f"{r['decode_tokens_per_s'] or float('nan'):6.1f} tok/s decoding", flush=True)
    print(f"speedup {result['speedup']:.2f}x end to end, {result['decode_speedup'] or float('nan'):.2f}x decoding; "
          f"acceptance {rate if rate is None else f'{rate:.0%}'} of {on['drafted']} drafts; "
          f"greedy outputs {'identical' if identical else 'DIFFER'}")
    print(f"wrote {write_json('speculative', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
