"""Speed at low load: time per output token (TPOT) at batch 1, 2, 4, 8 for the base and one LoRA (rank 16 on all
seven projections), in the engine's step loop, beside the memory-bandwidth floor of a decode step.

TPOT: b requests of random prompts (--prompt-tokens) arrive together and each draws --new-tokens tokens; per
request, (time of its last token - time of its first) / (tokens - 1): the decode phase, one token per step. That
equals (time of an N-token request - time of a 1-token request) / (N - 1), the llama.cpp peer's definition
(bench.llamacpp), without subtracting two noisy runs. Median over every request of every repeat; base and LoRA
alternate at each batch size. With --llama-server, llama.cpp's server runs beside the engine and takes its turn
after each of the engine's at batch 1 (same prompts): on a machine whose bandwidth drifts between minutes, the
turn-by-turn ratio is the figure to compare.

Floor: the bytes one decode step must read (every projection, norm and the LM head once, in the engine's dtype, plus
the LoRA's A and B; the embedding table only one row per token, so not counted) / the read bandwidth measured in
the same run (the best of --bandwidth-repeats reads of --bandwidth-mb: torch's sum of a float32 tensor and, on a
CPU with Quiver's kernels, a one-row bfloat16 projection streaming a weight that size, with the engine's threads;
the faster one). TPOT / floor is how far a step is from streaming its weights at that speed. The bandwidth drifts
between minutes on a shared machine, so a short probe (--turn-probe-repeats reads) also runs before every turn of
either engine, and tpot_vs_floor_by_turn is the median of each turn's TPOT over the floor at that probe.

    quiver bench lowload [--model DIR|SHAPE (e.g. llama-1b)] [--batches 1 2 4 8] [--new-tokens 128]
                         [--repeats 2] [--rank 16] [--threads N] [--dtype auto|float32|bfloat16]
                         [--llama-server PATH --gguf BASE.gguf [--gguf-lora LORA.gguf]]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quiver.bench.adapters import ALL7, make_adapters
from quiver.bench.common import add_device_args, add_out_arg, dtype_name, machine, release, synchronize, write_json
from quiver.bench.models import MODEL_HELP, bench_model
from quiver.kernels import cpu_kernels
from quiver.server.model.huge_pages import collapse


def read_bandwidth(mb: int, repeats: int, device="cpu") -> dict:
    """GB/s of reading a float32 tensor (its sum), of copying it (read + write counted) and, on a CPU where
    Quiver's kernels take bfloat16 projections, of streaming a bfloat16 weight of that size through the one-row
    projection: the best of `repeats` each. The floor divides by the fastest read (floor_gb_per_s): on an
    AVX-512 EPYC that projection read memory up to 30% faster than torch's sum in some runs (and a little
    slower in others), and a floor must not be slower than what is reached. On the CPU the tensors sit on the
    2 MiB pages the engine's weights are given (server.model.huge_pages), which read faster than 4 KiB ones."""
    x, y, w = _probe_tensors(mb, str(device))
    probes = {"read": x.sum, "copy": lambda: y.copy_(x)}
    if w is not None:
        row = torch.ones(1, 1024, dtype=torch.bfloat16)
        probes["projection"] = lambda: cpu_kernels.linear(row, w, w.shape[0] * 64, None)
    best = {kind: float("inf") for kind in probes}
    for _ in range(repeats + 1):  # the first of each warms the pages
        for kind, fn in probes.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            best[kind] = min(best[kind], time.perf_counter() - t0)
    nbytes = mb * 2**20
    out = {"read_gb_per_s": nbytes / best["read"] / 1e9, "copy_gb_per_s": 2 * nbytes / best["copy"] / 1e9,
           "projection_read_gb_per_s": nbytes / best["projection"] / 1e9 if "projection" in best else None,
           "tensor_mb": mb}
    out["floor_gb_per_s"] = max(out["read_gb_per_s"], out["projection_read_gb_per_s"] or 0.0)
    return out


@functools.cache
def _probe_tensors(mb: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """read_bandwidth's tensors, made once a run: each turn's probe reuses them."""
    x = torch.ones(mb * 2**20 // 4, device=device)
    y, w = torch.zeros_like(x), None
    if torch.device(device).type == "cpu":
        if cpu_kernels.fast():
            w = cpu_kernels.blocked(torch.ones(mb * 2**20 // 2048, 1024, dtype=torch.bfloat16))
        collapse([(t.data_ptr(), t.nbytes) for t in (x, y, w) if t is not None])
    return x, y, w


def step_bytes(mc, itemsize: int, rank: int = 0) -> int:
    """Bytes a decode step reads from the weights: each layer's projections and two norms, the final norm and the
    LM head; with rank > 0, a LoRA's A [r, in] and B [out, r] on all seven projections of every layer."""
    h, d, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    q, kv = mc.num_heads * d, mc.num_kv_heads * d
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # (in, out), ALL7's order
    per_layer = sum(i * o for i, o in shapes) + 2 * h + rank * sum(i + o for i, o in shapes)
    return itemsize * (mc.num_layers * per_layer + mc.vocab_size * h + h)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def tpots_ms(engine, prompts: list[list[int]], new_tokens: int, adapter: str | None) -> list[float]:
    """Each request's decode-phase time per output token (ms), all requests arriving together."""
    from quiver.server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params, adapter=adapter).request_id for p in prompts]
    first: dict[str, tuple[float, int]] = {}
    last: dict[str, tuple[float, int]] = {}
    while engine.has_work():
        outs = engine.step()
        synchronize(engine.device)
        now = time.perf_counter()
        for out in outs:
            first.setdefault(out.request_id, (now, out.num_output_tokens))
            last[out.request_id] = (now, out.num_output_tokens)
    return [(last[r][0] - first[r][0]) / (last[r][1] - first[r][1]) * 1000 for r in ids]


def row(variant: str, batch: int, tpots: list[float], nbytes: int, bandwidth: float,
        turns: list[tuple[float, float]]) -> dict:
    """turns: (the turn's median TPOT, the read bandwidth probed just before it) for each turn."""
    tpot = statistics.median(tpots)
    floor = nbytes / (bandwidth * 1e9) * 1000
    by_turn = [t / (nbytes / (bw * 1e9) * 1000) for t, bw in turns]
    return {"variant": variant, "batch": batch, "tpot_ms": tpot, "tpot_ms_all": tpots, "tokens_per_s": batch * 1000 / tpot,
            "step_bytes": nbytes, "floor_ms": floor, "tpot_vs_floor": tpot / floor,
            "turn_gb_per_s": [bw for _, bw in turns], "tpot_vs_floor_by_turn": statistics.median(by_turn),
            "achieved_gb_per_s": nbytes / tpot / 1e6}


def print_row(r: dict) -> None:
    print(f"{r['variant']:16s} batch {r['batch']:2d}: {r['tpot_ms']:7.2f} ms/token ({r['tokens_per_s']:7.1f} tok/s)   "
          f"floor {r['floor_ms']:6.2f} ms   {r['tpot_vs_floor']:5.2f}x floor ({r['tpot_vs_floor_by_turn']:.2f}x by "
          f"turn)   weights read at {r['achieved_gb_per_s']:5.1f} GB/s", flush=True)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (and llama-server's -t; default: all cores)")
    ap.add_argument("--bandwidth-mb", type=int, default=512, help="size of the tensor the read bandwidth is measured on")
    ap.add_argument("--bandwidth-repeats", type=int, default=10)
    ap.add_argument("--turn-probe-repeats", type=int, default=3, help="reads of the probe before every turn")
    ap.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary: its batch-1 TPOT too")
    ap.add_argument("--gguf", type=Path, default=None, help="the same base model as GGUF, for --llama-server")
    ap.add_argument("--gguf-lora", type=Path, default=None, help="a LoRA as GGUF, for --llama-server (optional)")
    add_device_args(ap)
    add_out_arg(ap)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="quiver bench lowload")
    add_args(ap)
    args = ap.parse_args(argv)
    if (args.llama_server is None) != (args.gguf is None):
        ap.error("--llama-server and --gguf go together")
    if args.gguf_lora is not None and args.gguf is None:
        ap.error("--gguf-lora needs --llama-server and --gguf")
    for path in (args.llama_server, args.gguf, args.gguf_lora):
        if path is not None and not path.is_file():
            ap.error(f"no such file: {path}")
    if args.llama_server is not None and 1 not in args.batches:
        ap.error("--llama-server is measured at batch 1: put 1 in --batches")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (TPOT is measured after the first token)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from transformers import AutoModelForCausalLM

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    shapes = tempfile.TemporaryDirectory()  # a named shape's random model, for this run
    engine = LLMEngine(EngineConfig(model=bench_model(args.model, shapes.name), num_threads=args.threads,
                                    device=args.device, dtype=args.dtype, max_loras=1, max_lora_rank=args.rank,
                                    max_num_seqs=max(8, *args.batches)))
    threads = torch.get_num_threads()
    mc, itemsize = engine.model_config, torch.empty(0, dtype=engine.dtype).element_size()
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).eval()
        engine.load_adapter("lora", str(make_adapters(hf, Path(tmp), 1, args.rank)[0]))
        del hf
    release(args.device)
    bw = read_bandwidth(args.bandwidth_mb, args.bandwidth_repeats, engine.device)
    read = bw["floor_gb_per_s"]
    probe = bw["projection_read_gb_per_s"]
    print(f"{engine.model_name}, {dtype_name(engine.dtype)}, {threads} threads: read bandwidth {read:.1f} GB/s "
          f"(sum {bw['read_gb_per_s']:.1f}{f', one-row projection {probe:.1f}' if probe else ''}, copy "
          f"{bw['copy_gb_per_s']:.1f} GB/s); a step reads {step_bytes(mc, itemsize) / 1e6:.0f} MB of base "
          f"weights, {(step_bytes(mc, itemsize, args.rank) - step_bytes(mc, itemsize)) / 1e6:.1f} MB of LoRA",
          flush=True)
    variants = {"base": (None, step_bytes(mc, itemsize)), f"lora r{args.rank}": ("lora", step_bytes(mc, itemsize, args.rank))}
    tpots_ms(engine, random_prompts(1, args.prompt_tokens, mc.vocab_size, 0), 8, "lora")  # warm-up
    with contextlib.ExitStack() as stack:
        peer = None
        if args.llama_server is not None:
            from quiver.bench.llamacpp import LlamaServer

            peer = stack.enter_context(LlamaServer(args.llama_server, args.gguf, args.gguf_lora, threads))
        rows, peer_samples = [], {variant: [] for variant in variants}
        peer_turns: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}

        def probe() -> float:
            return read_bandwidth(args.bandwidth_mb, args.turn_probe_repeats, engine.device)["floor_gb_per_s"]

        for b in args.batches:
            samples: dict[str, list[float]] = {variant: [] for variant in variants}
            turns: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}
            for rep in range(args.repeats):  # base and LoRA alternate, at batch 1 each beside llama.cpp's
                for i, (variant, (adapter, _)) in enumerate(variants.items()):
                    prompts = random_prompts(b, args.prompt_tokens, mc.vocab_size, seed=1 + 1000 * rep + 10 * b + i)
                    bw_now = probe()
                    mine = tpots_ms(engine, prompts, args.new_tokens, adapter)
                    samples[variant] += mine
                    turns[variant].append((statistics.median(mine), bw_now))
                    if peer is not None and b == 1 and (adapter is None or args.gguf_lora is not None):
                        time.sleep(PAUSE_S)
                        bw_now = probe()
                        peer_samples[variant].append(peer.tpot_ms(prompts, args.new_tokens, lora=adapter is not None))
                        peer_turns[variant].append((peer_samples[variant][-1]["tpot_ms"], bw_now))
                        time.sleep(PAUSE_S)
            for variant, (_, nbytes) in variants.items():
                rows.append(row(variant, b, samples[variant], nbytes, read, turns[variant]))
                print_row(rows[-1])
    result = {"benchmark": "lowload", "model": engine.model_name, "device": args.device,
              "dtype": dtype_name(engine.dtype), "threads": threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "rank": args.rank, "targets": ALL7,
              "engine_weight_bytes": engine.weight_bytes(), "bandwidth": bw, "machine": machine(), "rows": rows}
    if peer is not None:
        result["llama_server"] = llama_rows(rows, peer_samples, peer_turns, variants, read)
    path = write_json("lowload", result, args.out)
    print(f"wrote {path}")
    return result


PAUSE_S = 0.5  # between Quiver's and llama.cpp's turns: neither one's threads still spinning in the other's


def llama_rows(rows: list[dict], peer_samples: dict, peer_turns: dict, variants: dict, read: float) -> list[dict]:
    """llama-server's batch-1 rows from the turns it took beside the engine's (same prompts, alternated), with
    the median of the turn-by-turn ratio engine / llama.cpp: the machine's drift between turns cancels. The
    floor is the engine dtype's, so compare it with a GGUF of the same type."""
    out = []
    for variant, (_, nbytes) in variants.items():
        mine = peer_samples[variant]
        if not mine:
            continue
        out.append(row(f"llama.cpp {variant}", 1, [t for r in mine for t in r["tpot_ms_all"]], nbytes, read,
                       peer_turns[variant]))
        out[-1]["server_predicted_per_token_ms"] = [r["server_predicted_per_token_ms"] for r in mine]
        ours = next(r for r in rows if r["variant"] == variant and r["batch"] == 1)["tpot_ms_all"]
        out[-1]["quiver_over_llama_by_turn"] = ratios = [q / r["tpot_ms"] for q, r in zip(ours, mine)]
        print_row(out[-1])
        print(f"{'':16s} Quiver / llama.cpp, turn by turn: median {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
        if variant != "base" and peer_samples["base"]:  # the LoRA rows against llama.cpp's base rows
            base_turns = [r["tpot_ms"] for r in peer_samples["base"]]
            out[-1]["quiver_over_llama_base_by_turn"] = ratios = [q / b for q, b in zip(ours, base_turns)]
            print(f"{'':16s} Quiver {variant} / llama.cpp base, turn by turn: median {statistics.median(ratios):.3f}",
                  flush=True)
    return out


if __name__ == "__main__":
    main()
