"""Cost of each adapter family against the base model at batch 32, in one run: decode
throughput (output tokens/s once every row has its first token) and end-to-end throughput.

    quiver bench families [--batch 32] [--new-tokens 64] [--adapters 8] [--virtual-tokens 20]
                          [--device cpu|cuda[:N]] [--dtype auto|float32|bfloat16|float16]
                          [--model DIR|SHAPE]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from quiver.bench.adapters import make_adapters
from quiver.bench.common import (add_device_args, add_out_arg, cuda_peak, dtype_name, machine, release, results_dir,
                                 write_json)
from quiver.bench.models import MODEL_HELP, bench_model
from quiver.bench.plot import bar_plot
from quiver.bench.throughput import prompts
from quiver.server.families.bottleneck import BASES as BOTTLENECK_BASES


def make_prompt_adapters(hf, root: Path, kind: str, n: int, virtual: int) -> list[Path]:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    configs = {
        "prompt_tuning": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual),
        "p_tuning": lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual,
                                                encoder_hidden_size=128),
        "prefix_tuning": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual),
    }
    paths = []
    for i in range(n):
        torch.manual_seed(2000 + i)
        model = get_peft_model(hf, configs[kind]())
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / f"{kind}{i}")
        paths.append(root / f"{kind}{i}")
    return paths


def make_bottleneck_adapters(hidden: int, num_layers: int, root: Path, n: int, reduction: int = 16) -> list[Path]:
    """Pfeiffer (seq_bn) adapters after every MLP, in AdapterHub's file layout."""
    import json

    from safetensors.torch import save_file

    paths = []
    width = hidden // reduction
    for i in range(n):
        g = torch.Generator().manual_seed(3000 + i)
        tensors = {}
        for layer in range(num_layers):
            p = f"model.layers.{layer}.output_adapters.adapters.bn{i}"
            tensors.update({f"{p}.adapter_down.0.weight": torch.randn(width, hidden, generator=g) * 0.02,
                            f"{p}.adapter_down.0.bias": torch.zeros(width),
                            f"{p}.adapter_up.weight": torch.randn(hidden, width, generator=g) * 0.02,
                            f"{p}.adapter_up.bias": torch.zeros(hidden)})
        path = root / f"bottleneck{i}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"config": {
            "architecture": "bottleneck", "original_ln_before": True, "original_ln_after": True,
            "residual_before_ln": True, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
            "reduction_factor": reduction, "scaling": 1.0}, "hidden_size": hidden, "name": f"bn{i}"}))
        save_file(tensors, str(path / "adapter.safetensors"))
        paths.append(path)
    return paths


def run(engine, tokenizer, texts, new_tokens: int, adapters) -> tuple[float, float]:
    """(decode tok/s, end-to-end tok/s)."""
    from quiver.server.engine.sampling import SamplingParams

    seqs = [engine.add_request(tokenizer(t).input_ids, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                      ignore_eos=True), adapter=adapters[i])
            for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    n = len(texts)
    return n * (new_tokens - 1) / (t2 - t1), n * new_tokens / (t2 - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="quiver bench families")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters per family")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help=MODEL_HELP)
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine

    shapes = tempfile.TemporaryDirectory()  # a named shape's random model, for this run
    engine = LLMEngine(EngineConfig(model=bench_model(args.model, shapes.name), num_threads=args.threads, device=args.device,
                                    dtype=args.dtype, max_loras=args.adapters, max_lora_rank=args.rank,
                                    max_num_seqs=max(64, args.batch)))
    threads = torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(args.device).eval()
    texts = prompts(args.batch)
    families: dict[str, list[str | None]] = {"base": [None] * args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mc = engine.model_config
        bottleneck = ("bottleneck",) if mc.model_type in BOTTLENECK_BASES else ()  # served on Llama-like bases only
        for kind in ("lora", "prompt_tuning", "p_tuning", "prefix_tuning", *bottleneck):
            if kind == "lora":
                paths = make_adapters(hf, root, args.adapters, args.rank)
            elif kind == "bottleneck":
                paths = make_bottleneck_adapters(mc.hidden_size, mc.num_layers, root, args.adapters)
            else:
                paths = make_prompt_adapters(hf, root, kind, args.adapters, args.virtual_tokens)
            names = [f"{kind}{i}" for i in range(len(paths))]
            for name, path in zip(names, paths):
                engine.load_adapter(name, str(path))
            families[kind] = [names[i % len(names)] for i in range(args.batch)]
        kinds = [k for k in families if k != "base"]
        families["mixed"] = [None if i % (len(kinds) + 1) == 0 else families[kinds[i % (len(kinds) + 1) - 1]][i]
                             for i in range(args.batch)]
        del hf
        release(args.device)  # the PEFT model only made the adapters: measure without it
        run(engine, tokenizer, texts[:2], 4, [None, None])  # warm-up
        rows = []
        for kind, adapters in families.items():
            base_decode, _ = run(engine, tokenizer, texts, args.new_tokens, families["base"])  # neighbour base run
            decode, e2e = run(engine, tokenizer, texts, args.new_tokens, adapters)
            rows.append({"family": kind, "decode_tokens_per_s": decode, "end_to_end_tokens_per_s": e2e,
                         "base_decode_tokens_per_s": base_decode, "decode_vs_base": decode / base_decode})
            print(f"{kind:14s} decode {decode:7.1f} tok/s ({decode / base_decode:4.2f}x its base neighbour "
                  f"{base_decode:7.1f})   end to end {e2e:7.1f} tok/s", flush=True)
    out_dir = results_dir(args.out)
    result = {"benchmark": "families", "model": engine.model_name, "device": args.device,
              "dtype": dtype_name(engine.dtype), "threads": threads,
              "batch": args.batch, "new_tokens": args.new_tokens, "adapters_per_family": args.adapters,
              "virtual_tokens": args.virtual_tokens, "lora_rank": args.rank, "machine": machine(),
              **cuda_peak(engine.device), "rows": rows}
    base = rows[0]["decode_tokens_per_s"]
    result["plot"] = str(bar_plot(out_dir / "families.png", [r["family"] for r in rows],
                                  [r["decode_tokens_per_s"] for r in rows], "decode tokens/s",
                                  f"batch {args.batch} over {args.adapters} adapters per family, "
                                  f"{args.virtual_tokens} virtual tokens, LoRA r={args.rank}", reference=0.8 * base))
    print("wrote", write_json("families", result, out_dir), "and", result["plot"])
    return result
