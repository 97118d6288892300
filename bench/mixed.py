"""Engine step times on a mixed workload: rows decoding at contexts of 64-600 tokens while long prompts
arrive and prefill (in chunks) in the same steps. Reports the median time of decode-only steps and of
mixed prefill + decode steps, through the real engine (SmolLM2 by default).

    quiver bench mixed [--decoders 24] [--prompt-tokens 768] [--arrivals 6] [--threads N]
                       [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from quiver.bench.common import add_device_args, add_out_arg, cuda_peak, dtype_name, machine, synchronize, write_json


def main(argv: list[str] | None = None) -> dict:
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.sampling import SamplingParams

    ap = argparse.ArgumentParser(prog="quiver bench mixed")
    ap.add_argument("--model", default=None)
    ap.add_argument("--decoders", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=768)
    ap.add_argument("--arrivals", type=int, default=6, help="long prompts, one every 8 steps")
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, device=args.device,
                                    dtype=args.dtype))
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 20000, (n,), generator=g).tolist()  # noqa: E731
    decode = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for i in range(args.decoders):
        engine.add_request(ids(64 + (i * 536) // max(1, args.decoders - 1)), decode)
    while any(s.num_computed < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()  # all decoders past their prompts: from here every step decodes them
    kinds: dict[str, list[float]] = {"decode": [], "mixed": []}
    seen: list = []
    engine.observers.append(lambda step, _: seen.append(max(n for _, n in step.rows)))
    step, arrived = 0, 0
    while engine.has_work():
        if arrived < args.arrivals and step % 8 == 0:
            engine.add_request(ids(args.prompt_tokens), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            arrived += 1
        seen.clear()
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        took = time.perf_counter() - t0
        if seen and len(engine.seqs) > 1:
            kinds["mixed" if seen[0] > 1 else "decode"].append(took * 1000)
        step += 1
    result = {"machine": machine(), "device": args.device, "dtype": dtype_name(engine.dtype),
              **cuda_peak(engine.device), "decoders": args.decoders,
              "prompt_tokens": args.prompt_tokens, "arrivals": args.arrivals,
              **{f"{k}_steps": len(v) for k, v in kinds.items()},
              **{f"{k}_step_ms_median": statistics.median(v) if v else None for k, v in kinds.items()}}
    print(f"decode-only steps: {result['decode_steps']}, median {result['decode_step_ms_median']:.1f} ms; "
          f"mixed prefill + decode steps: {result['mixed_steps']}, median {result['mixed_step_ms_median']:.1f} ms")
    path = write_json("mixed", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
