"""`quiver serve`: the command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from quiver.adapters.combine import METHODS

from quiver.server.engine.config import DTYPES, EngineConfig
from quiver.server.http.limits import RequestLimits


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="name reported by /v1/models and in responses")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="auto: float32 on the CPU, the checkpoint's dtype (mostly bfloat16) on a GPU")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (overrides --kv-cache-memory-mb)")
    p.add_argument("--kv-cache-memory-mb", type=int, default=None,
                   help="KV-cache size in MiB (default 512 on the CPU; on a GPU, what --gpu-memory-utilization leaves)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of the GPU's memory the engine may use in all; the KV cache takes what the weights, "
                        "the LoRA slots and a working reserve leave of it")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most requests in one batch (64 on the CPU, 256 "
                                                                  "on a GPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one step, longer prompts prefill in chunks (2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds requests that give no seed of their own")
    p.add_argument("--max-loras", type=int, default=d.max_loras,
                   help="LoRA adapters held in device slots, and most distinct adapters in one step")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="largest LoRA rank accepted")
    p.add_argument("--lora-starvation-steps", type=int, default=d.lora_starvation_steps,
                   help="steps a request may wait on --max-loras before nothing else overtakes it")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load a PEFT adapter folder at start (repeatable)")
    p.add_argument("--adapter-dir", default=None,
                   help="every adapter folder in DIR is known by its name at start and read on first use")
    p.add_argument("--adapter-root", default=None,
                   help="folder that adapters loaded through the API must lie in "
                        "(default: --adapter-dir, else the working directory)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle adapter files (adapter_model.bin), with torch.load(weights_only=True)")
    p.add_argument("--max-adapter-mb", type=int, default=d.max_adapter_mb, help="largest adapter weight file read")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="LoRA adapters kept in host memory (default: no limit); beyond, the least recently used "
                        "idle one goes back to disk and is read again on its next use")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory_mb=args.kv_cache_memory_mb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_threads=args.num_threads, seed=args.seed,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, lora_starvation_steps=args.lora_starvation_steps,
        max_cpu_loras=args.max_cpu_loras, allow_pickle=args.allow_pickle, max_adapter_mb=args.max_adapter_mb)


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=PATH, got {spec!r}")
        out.append((name, path))
    return out


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--api-key", default=os.environ.get("QUIVER_API_KEY"),
                   help="every /v1 route and /metrics need 'Authorization: Bearer KEY' (env QUIVER_API_KEY)")
    p.add_argument("--admin-key", default=os.environ.get("QUIVER_ADMIN_KEY"),
                   help="key for adapter management routes, instead of --api-key (env QUIVER_ADMIN_KEY)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new generation requests with 503 + Retry-After while this many wait")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from arrival to its last token (504 / an error event)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before the server exits")
    d = RequestLimits()
    p.add_argument("--max-request-bytes", type=int, default=d.max_body_bytes, help="largest request body (413 beyond)")
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one /v1/completions request")
    p.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings in one request")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters of one stop string")
    p.add_argument("--max-stop-token-ids", type=int, default=d.max_stop_token_ids,
                   help="stop_token_ids in one request")
    p.add_argument("--max-name-chars", type=int, default=d.max_name_chars,
                   help="characters of a request's model and adapter fields")


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_body_bytes=args.max_request_bytes, max_prompts=args.max_prompts, max_stop=args.max_stop,
                         max_stop_chars=args.max_stop_chars, max_stop_token_ids=args.max_stop_token_ids,
                         max_name_chars=args.max_name_chars)


def serve(args: argparse.Namespace) -> None:
    import signal
    import threading

    import uvicorn

    from quiver.server.http.app import create_app
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.http.guard import Guard, install
    from quiver.server.engine.metrics import Metrics

    log = logging.getLogger(__name__)
    adapters = parse_adapters(args.adapter)
    engine = LLMEngine(engine_config(args))
    for name, path in adapters:
        engine.load_adapter(name, path)
    if args.adapter_dir:
        engine.registry.add_dir(args.adapter_dir)
    async_engine = AsyncEngine(engine, Metrics(), request_timeout=args.request_timeout)
    app = create_app(async_engine, adapter_root=args.adapter_root or args.adapter_dir, limits=request_limits(args))
    install(app, async_engine, Guard(api_key=args.api_key, admin_key=args.admin_key,
                                     metrics_public=args.metrics_public, max_waiting=args.max_waiting))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=args.shutdown_grace))
    http = threading.Thread(target=server.run, name="quiver-http", daemon=True)

    def shutdown(signum, _):
        if async_engine.draining:  # a second signal: stop now
            server.force_exit = True
            async_engine.stop()
            return
        log.info("%s: draining (up to %g s), then exiting", signal.Signals(signum).name, args.shutdown_grace)
        async_engine.draining = True  # new requests get 503; uvicorn stops listening and waits for the rest
        server.should_exit = True

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    log.info("serving %s on http://%s:%d", engine.model_name, args.host, args.port)
    http.start()
    # the engine loop owns the main thread (see AsyncEngine.run); HTTP lives on its own thread and,
    # once it has drained and ended, stops the engine
    watcher = threading.Thread(target=lambda: (http.join(), async_engine.stop()), daemon=True)
    watcher.start()
    async_engine.run()
    server.should_exit = True
    http.join(timeout=30)


def merge(args: argparse.Namespace) -> None:
    import torch

    from quiver.server.merge import check_merge, merge_adapters
    from quiver.server.model.checkpoint import resolve_model

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ValueError("give one --weight per --adapter, or none")
    model_dir, _ = resolve_model(args.model)
    adapters = list(zip(args.adapter, weights))
    how = dict(combination=args.combination, density=args.density, majority_sign=args.majority_sign, seed=args.seed)
    out = merge_adapters(model_dir, adapters, args.out, getattr(torch, args.dtype), progress=True, **how)
    print(f"merged model written to {out}")
    if args.check:
        diff = check_merge(model_dir, out, adapters, args.dtype, **how)
        tol = args.check_tol if args.check_tol is not None else (1e-3 if args.dtype == "float32" else 1.0)
        print(f"check: max |logit difference|, merged vs served unmerged, {diff:.3g} (tolerance {tol:g})")
        if not diff <= tol:
            sys.exit(f"quiver: error: the merged model differs from the unmerged adapter by {diff:.3g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quiver", description="Quiver: many task adapters over one base model")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold LoRA-family adapters into the base weights, offline")
    m.add_argument("--model", default=None, help="base model directory or .gguf (default: the embedded SmolLM2)")
    m.add_argument("--adapter", action="append", required=True, help="PEFT adapter folder (repeatable)")
    m.add_argument("--weight", action="append", type=float, help="weight of each --adapter, in order (default 1)")
    m.add_argument("--out", required=True, help="output directory (a plain HF model)")
    m.add_argument("--dtype", choices=[d for d in DTYPES if d != "auto"], default="float32")
    m.add_argument("--combination", choices=METHODS, default="cat",
                   help="how several adapters combine (PEFT's add_weighted_adapter): cat is the exact weighted "
                        "sum; linear, ties, dare_linear, dare_ties, magnitude_prune work on A and B entry by entry")
    m.add_argument("--density", type=float, default=None,
                   help="fraction of entries kept by ties, dare, magnitude_prune")
    m.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="ties' sign election")
    m.add_argument("--seed", type=int, default=0, help="seeds dare's random drops")
    m.add_argument("--check", action="store_true",
                   help="afterwards, compare the merged model's logits with the base serving the adapters unmerged")
    m.add_argument("--check-tol", type=float, default=None,
                   help="largest logit difference --check accepts (default 1e-3 in float32; 1.0 in 16-bit, where "
                        "the merged weights are rounded once and unmerged serving rounds W and the adapter apart)")
    b = sub.add_parser("bench", help="run a benchmark (python -m quiver.bench NAME ...)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("serve", help="serve the OpenAI-style HTTP API")
    add_engine_args(p)
    add_serve_args(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            serve(args)
        elif args.command == "merge":
            merge(args)
        elif args.command == "bench":  # a separate program: the server does not depend on the benchmarks
            os.execv(sys.executable, [sys.executable, "-m", "quiver.bench", *args.bench_args])
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        parser.exit(2, f"quiver: error: {exc}\n")


if __name__ == "__main__":
    main()
