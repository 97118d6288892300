"""`quiver serve`: the command line."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys

from quiver.adapters.combine import METHODS

from quiver.server.engine.config import DTYPES, EngineConfig
from quiver.server.http.limits import RequestLimits
from quiver.server.http.tools import PARSERS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="name reported by /v1/models and in responses")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="auto: bfloat16 on a CPU with AVX512-BF16 or AMX, float32 on other CPUs, the "
                        "checkpoint's dtype (mostly bfloat16) on a GPU")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="keep computed KV blocks, keyed by their tokens and the adapter's weights, so that a later "
                        "request starting with the same tokens skips their prefill (the default)")
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="turn the prefix cache off")
    p.add_argument("--quantization", choices=["nf4", "fp4"], default=None,
                   help="keep the base's projections 4-bit, quantized at load by bitsandbytes as transformers' "
                        "load_in_4bit does (QLoRA's base); a checkpoint saved 4-bit by bitsandbytes needs no flag")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="with --quantization: fp32 block scales (bnb_4bit_use_double_quant=False); default: "
                        "8-bit scales, as QLoRA trains")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with a 4-bit base: the embedding table and output head 4-bit too (bitsandbytes keeps them "
                        "at full precision, so outputs move slightly); needs bitsandbytes")
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
    p.add_argument("--lora-modules", action="extend", nargs="+", default=[], metavar="NAME=PATH|JSON",
                   help="vLLM's spelling of --adapter: NAME=PATH items, or JSON objects "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}' (base_model_name is accepted and "
                        "unused: the parent is always the served model); several after one flag, and repeatable")
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
        max_cpu_loras=args.max_cpu_loras, allow_pickle=args.allow_pickle, max_adapter_mb=args.max_adapter_mb,
        quantization=args.quantization, double_quant=args.double_quant, quantize_embeddings=args.quantize_embeddings,
        enable_prefix_caching=args.enable_prefix_caching)


def split_name_path(spec: str, flag: str, expects: str = "NAME=PATH") -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{flag} expects {expects}, got {spec!r}")
    return name, path


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    return [split_name_path(spec, "--adapter") for spec in specs]


LORA_MODULE_FIELDS = ("name", "path", "base_model_name")  # vLLM's LoRAModulePath


def parse_lora_modules(items: list[str]) -> list[tuple[str, str]]:
    """vLLM's --lora-modules: NAME=PATH, or a JSON object with name, path and optionally base_model_name."""
    out = []
    for item in items:
        if not item.lstrip().startswith("{"):
            out.append(split_name_path(item, "--lora-modules", 'NAME=PATH or JSON {"name": ..., "path": ...}'))
            continue
        try:
            spec = json.loads(item)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: {item!r} is not valid JSON ({exc})") from None
        unknown = sorted(set(spec) - set(LORA_MODULE_FIELDS))
        if unknown:
            raise ValueError(f"--lora-modules: unknown field(s) {', '.join(unknown)} in {item!r} "
                             f"(fields: {', '.join(LORA_MODULE_FIELDS)})")
        if not all(isinstance(spec.get(key), str) and spec[key] for key in ("name", "path")):
            raise ValueError(f'--lora-modules: {item!r} needs "name" and "path" strings')
        out.append((spec["name"], spec["path"]))
    return out


def startup_adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, path) of every adapter --adapter and --lora-modules load at start."""
    adapters = parse_adapters(args.adapter) + parse_lora_modules(args.lora_modules)
    names = [name for name, _ in adapters]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ValueError(f"adapter {twice!r} is given twice (--adapter, --lora-modules)")
    return adapters


def take_model_tag(args: argparse.Namespace) -> None:
    """`quiver serve MODEL` is `quiver serve --model MODEL`, as in `vllm serve MODEL`."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"the model is given twice, as {args.model_tag!r} and as --model {args.model!r}")
    args.model = args.model or args.model_tag


def listen_socket(host: str, port: int) -> socket.socket:
    """--host/--port bound before the model loads (as vLLM does), and handed to uvicorn: a port in use is
    a one-line error at once, not uvicorn's failure once the model has loaded."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "the address is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {why}") from None
    return sock


def quiet_progress_bars() -> None:
    """No tqdm bars in a server's log. transformers' ("Loading weights", the GGUF conversion, which
    ignores transformers' own disable_progress_bar) and huggingface_hub's bars are all tqdm's; tqdm was
    imported (by torch) before any flag was read, too early for TQDM_DISABLE: its default is changed."""
    from functools import partialmethod

    import tqdm

    tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)


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
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="sequences one request may ask for: prompts x n")
    p.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings in one request")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters of one stop string")
    p.add_argument("--max-stop-token-ids", type=int, default=d.max_stop_token_ids,
                   help="stop_token_ids in one request")
    p.add_argument("--max-name-chars", type=int, default=d.max_name_chars,
                   help="characters of a request's model and adapter fields")
    p.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how tool_choice auto reads tool calls in the output (default: the chat template's format, "
                        "when it has one)")
    # vLLM's switches for what is always on here, accepted so that a vLLM command line runs as it is
    p.add_argument("--enable-auto-tool-choice", action="store_true", help="accepted (tool_choice auto is on "
                                                                          "whenever a tool-call format is known)")
    p.add_argument("--enable-lora", action="store_true", help="accepted (adapters are always on)")


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_body_bytes=args.max_request_bytes, max_prompts=args.max_prompts, max_stop=args.max_stop,
                         max_stop_chars=args.max_stop_chars, max_stop_token_ids=args.max_stop_token_ids,
                         max_name_chars=args.max_name_chars)


def build_server(args: argparse.Namespace):
    """The engine (not yet running) and the HTTP app `quiver serve ARGS` serves: (AsyncEngine, FastAPI app).
    Each Ray Serve replica builds the same pair from the same flags."""
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics
    from quiver.server.http.app import create_app
    from quiver.server.http.guard import Guard, install

    adapters = startup_adapters(args)
    quiet_progress_bars()
    engine = LLMEngine(engine_config(args))
    for name, path in adapters:
        engine.load_adapter(name, path)
    if args.adapter_dir:
        engine.add_adapter_dir(args.adapter_dir)
    async_engine = AsyncEngine(engine, Metrics(), request_timeout=args.request_timeout)
    app = create_app(async_engine, adapter_root=args.adapter_root or args.adapter_dir, limits=request_limits(args),
                     tool_parser=args.tool_call_parser)
    install(app, async_engine, Guard(api_key=args.api_key, admin_key=args.admin_key,
                                     metrics_public=args.metrics_public, max_waiting=args.max_waiting))
    return async_engine, app


def serve(args: argparse.Namespace) -> None:
    import signal
    import threading

    import uvicorn

    log = logging.getLogger(__name__)
    sock = listen_socket(args.host, args.port)
    async_engine, app = build_server(args)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=args.shutdown_grace))
    http = threading.Thread(target=server.run, args=([sock],), name="quiver-http", daemon=True)

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
    log.info("serving %s on http://%s:%d", async_engine.model_name, args.host, sock.getsockname()[1])
    http.start()
    # the engine loop owns the main thread (see AsyncEngine.run); HTTP lives on its own thread and,
    # once it has drained and ended, stops the engine
    watcher = threading.Thread(target=lambda: (http.join(), async_engine.stop()), daemon=True)
    watcher.start()
    async_engine.run()
    server.should_exit = True
    http.join(timeout=30)
    if not server.started:
        sys.exit("quiver serve: error: the HTTP server did not start (see its log above)")


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
            sys.exit(f"quiver merge: error: the merged model differs from the unmerged adapter by {diff:.3g}")


DISTRIBUTION = "quiver-serve"  # [project] name in pyproject.toml


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="quiver", description="Quiver: many task adapters over one base model")
    parser.add_argument("--version", action="version", version=version(DISTRIBUTION))
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
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the same as --model (as in `vllm serve MODEL`)")
    p.add_argument("--version", action="version", version=version(DISTRIBUTION))
    add_engine_args(p)
    add_serve_args(p)
    from quiver.server.rayserve.app import add_ray_command
    add_ray_command(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("serve", "ray"):
            take_model_tag(args)
            startup_adapters(args)  # a bad flag is an error before the port is taken or Ray starts
            from quiver.server.rayserve.app import serve_forever
            (serve if args.command == "serve" else serve_forever)(args)
        elif args.command == "merge":
            merge(args)
        elif args.command == "bench":  # a separate program: the server does not depend on the benchmarks
            os.execv(sys.executable, [sys.executable, "-m", "quiver.bench", *args.bench_args])
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        command = "ray serve" if args.command == "ray" else args.command
        parser.exit(2, f"quiver {command}: error: {exc}\n")


if __name__ == "__main__":
    main()
