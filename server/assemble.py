"""The server's assembly from its flags: what `quiver serve` and each Ray Serve replica share (the flags,
the engine's config, the request limits, the adapters loaded at start) and the (AsyncEngine, app) pair
build_server() makes of them."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI

from quiver.server.engine.public import DTYPES, AsyncEngine, EngineConfig, LLMEngine, Metrics, warm_up
from quiver.server.http.app import create_app
from quiver.server.http.guard import Guard, install
from quiver.server.http.limits import RequestLimits
from quiver.server.http.prepare import PREFIX_CACHE_SCOPES
from quiver.server.http.tenants import read_keys_file
from quiver.server.http.tools import PARSERS

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the name(s) requests give the model, as in vLLM: /v1/models lists each, responses carry "
                        "the first (default: the model's folder or file name; its --model path is always accepted)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, type=lambda s: DTYPE_ALIASES.get(s, s),
                   help="auto: bfloat16 on a CPU with AVX512-BF16 or AMX, float32 on other CPUs, the "
                        "checkpoint's dtype (mostly bfloat16) on a GPU (vLLM's half and float: float16, float32)")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="keep computed KV blocks, keyed by their tokens and the adapter's weights, so that a later "
                        "request starting with the same tokens skips their prefill (the default)")
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="turn the prefix cache off")
    p.add_argument("--quantization", metavar="{nf4,fp4}", default=None,
                   help="keep the base's projections 4-bit, quantized at load by bitsandbytes as transformers' "
                        "load_in_4bit does (QLoRA's base); a checkpoint saved 4-bit by bitsandbytes needs no flag")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="with --quantization: fp32 block scales, not QLoRA's 8-bit (bnb_4bit_use_double_quant=False)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with a 4-bit base: the embedding table and output head 4-bit too (bitsandbytes keeps them "
                        "at full precision, so outputs move slightly); needs bitsandbytes")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 3}\' '
                        '(prompt lookup) or \'{"model": DIR, "num_speculative_tokens": 4, "draft_lora": {ADAPTER: DIR}}\'')
    p.add_argument("--compile", action="store_true", help="CPU: torch.compile adapter-free steps at start-up")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false", help="CPU: weights on 4 KiB pages")
    p.set_defaults(enforce_eager=None)  # --enforce-eager (a serve flag, add_vllm_args) wins over --compile
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
    p.add_argument("--num-threads", "--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds requests that give no seed of their own (default: "
                   "each draws one from the OS, so replicas and restarts differ)")
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
    p.add_argument("--adapter-root", default=None, help="folder that adapters loaded through the API must lie in "
                   "(default: --adapter-dir, else the working directory)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle adapter files (adapter_model.bin), with torch.load(weights_only=True)")
    p.add_argument("--max-adapter-mb", type=int, default=d.max_adapter_mb, help="largest adapter weight file read")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="LoRA adapters kept in host memory (default: 2 x --max-loras on a GPU, where they are "
                        "pinned; no limit on the CPU); beyond, the least recently used idle one goes back to disk "
                        "and is read again on its next use")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory_mb=args.kv_cache_memory_mb,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=not args.compile or bool(args.enforce_eager),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, num_threads=args.num_threads, seed=args.seed, huge_pages=args.huge_pages,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, lora_starvation_steps=args.lora_starvation_steps,
        max_cpu_loras=args.max_cpu_loras, allow_pickle=args.allow_pickle, max_adapter_mb=args.max_adapter_mb,
        quantization=args.quantization, double_quant=args.double_quant, quantize_embeddings=args.quantize_embeddings,
        enable_prefix_caching=args.enable_prefix_caching, speculative_config=args.speculative_config)


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


def is_model_path(arg: str) -> bool:
    path = Path(arg).expanduser()
    return (path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf")


def take_model_tag(args: argparse.Namespace) -> None:
    """`quiver serve MODEL` is `quiver serve --model MODEL`, as in `vllm serve MODEL`; and so is the last of
    several --served-model-name values when it is a model folder or .gguf file and no model was given."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"the model is given twice, as {args.model_tag!r} and as --model {args.model!r}")
    args.model = args.model or args.model_tag
    names = getattr(args, "served_model_name", None)  # quiver base-path has no such flag
    if args.model is None and names and len(names) > 1 and is_model_path(names[-1]):
        args.model = names.pop()  # `--served-model-name a MODEL`: the list took the model argument


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--api-key", default=os.environ.get("QUIVER_API_KEY"),
                   help="every /v1 route and /metrics need 'Authorization: Bearer KEY' (env QUIVER_API_KEY); an "
                        "admin key unless --admin-key is given")
    p.add_argument("--admin-key", default=os.environ.get("QUIVER_ADMIN_KEY"),
                   help="key for adapter management routes, instead of --api-key (env QUIVER_ADMIN_KEY)")
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="tenant keys (TOML or JSON): each key's tenant, the adapters it may use (names or globs), "
                        "whether it may use the base model and whether it is an admin; see docs/deployment.md")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    p.add_argument("--max-metric-adapters", type=int, default=64,
                   help="adapters with /metrics series of their own; the rest share adapter=\"_other\"")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new generation requests with 503 + Retry-After while this many wait")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take from arrival to its last token (504 / an error event)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish; those still running then get 503 "
                        "(server_shutting_down)")
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
    p.add_argument("--max-bad-words", type=int, default=d.max_bad_words,
                   help="bad_words in one request (their tokens: at most 16 per word in all)")
    p.add_argument("--max-grammar-chars", type=int, default=d.max_grammar_chars,
                   help="characters of one request's JSON schema, regex or grammar")
    p.add_argument("--prefix-cache-scope", choices=PREFIX_CACHE_SCOPES, default=d.prefix_cache_scope,
                   help="whose requests share prefix-cache blocks: tenant (with tenant keys, each tenant only its "
                        "own) or global (every request; cache_salt still separates)")
    p.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how tool_choice auto reads tool calls in the output (default: the chat template's format, "
                        "when it has one)")
    p.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   default=None, help="quiver serve's HTTP server's log level (default: --log-level; Ray Serve's proxy "
                                     "keeps its own)")
    add_vllm_args(p)


DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings of --dtype
QUANTIZATIONS = ("nf4", "fp4")
ONE_DEVICE = "Quiver runs the whole model on one device (quiver ray serve --replicas N scales out in whole copies)"
SWITCH = {"action": "store_true"}


def _any(value, args) -> bool:
    return True


def _one(value, args) -> bool:
    return value == 1


# vLLM's `vllm serve` flags that change nothing here (on one device, or what is always so), accepted so that a
# vLLM command line runs as it is, with a log line saying why: (flags, add_argument options, whether a value
# changes nothing, why it changes nothing, why any other value is refused)
VLLM_FLAGS = (
    (("--tensor-parallel-size", "-tp"), {"type": int, "metavar": "1"}, _one, "the model runs whole on one device",
     "tensor parallelism is not implemented: " + ONE_DEVICE),
    (("--pipeline-parallel-size", "-pp"), {"type": int, "metavar": "1"}, _one, "the model runs whole on one device",
     "pipeline parallelism is not implemented: " + ONE_DEVICE),
    (("--data-parallel-size", "-dp"), {"type": int, "metavar": "1"}, _one, "one engine serves",
     "data-parallel copies are Ray Serve replicas here: quiver ray serve --replicas N"),
    (("--distributed-executor-backend",), {"choices": ["ray", "mp", "uni", "external_launcher"]}, _any,
     "one device has no workers to launch", ""),
    (("--trust-remote-code",), SWITCH, _any, "no code from the model's folder ever runs: llama, mistral and qwen2 "
     "are Quiver's own code, other architectures are refused, and the tokenizer is read without remote code", ""),
    (("--download-dir",), {}, _any, "nothing is downloaded: MODEL is a local folder or .gguf file", ""),
    (("--enforce-eager",), SWITCH, _any, "no compiled step (the default; wins over --compile), no CUDA graphs", ""),
    (("--swap-space",), {"type": float}, _any, "a preempted request's KV blocks are recomputed, never swapped out",
     ""),
    (("--enable-chunked-prefill",), SWITCH, _any, "prompts longer than --max-num-batched-tokens are always "
     "prefilled in chunks", ""),
    (("--enable-lora",), SWITCH, _any, "adapters are always on", ""),
    (("--enable-auto-tool-choice",), SWITCH, _any, "tool_choice auto is on whenever a tool-call format is known", ""),
    (("--fully-sharded-loras",), SWITCH, _any, "LoRA sharding splits adapters across tensor-parallel devices, and "
     "there is one device", ""),
    (("--lora-dtype",), {"type": lambda s: DTYPE_ALIASES.get(s, s), "metavar": "auto"},
     lambda value, args: value in ("auto", args.dtype), "adapters are applied in the serving dtype (--dtype)",
     "adapters are applied in the serving dtype: give --dtype for both, or --lora-dtype auto"),
    (("--kv-cache-dtype",), {"metavar": "auto"}, lambda value, args: value == "auto",
     "the KV cache is in the serving dtype (--dtype)",
     "the KV cache is held in the serving dtype (--dtype); fp8 caches are not implemented"),
    (("--disable-log-requests",), SWITCH, _any, "no request's prompt or output is ever logged", ""),
    (("--max-log-len",), {"type": int}, _any, "no request's prompt is logged, so none is shortened", ""),
    (("--disable-log-stats",), SWITCH, _any, "no stats are logged periodically (they are on /metrics)", ""),
    (("--disable-frontend-multiprocessing",), SWITCH, _any, "the HTTP server and the engine already share one "
     "process", ""),
)


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's flags that change nothing here, accepted (and logged) so that a vLLM command "
                             "line runs as it is; a value other than the one shown is refused, with the reason")
    for flags, options, _, why, _ in VLLM_FLAGS:
        g.add_argument(*flags, default=None, help=why, **options)


def saved_4bit_by_bitsandbytes(model: str | None) -> bool:
    """Whether MODEL is a folder whose config.json says bitsandbytes 4-bit (what vLLM's --quantization
    bitsandbytes reads as it is, as Quiver always does)."""
    config = Path(model).expanduser() / "config.json" if model else None
    if config is None or not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))


def vllm_flags(args: argparse.Namespace) -> None:
    """Log each vLLM flag given that changes nothing here, and why; refuse (ValueError) a value that needs what
    Quiver lacks, naming the flag and the reason."""
    if args.quantization == "bitsandbytes" and saved_4bit_by_bitsandbytes(args.model):
        log.info("--quantization bitsandbytes: vLLM's flag, accepted; it changes nothing here: the checkpoint is "
                 "saved 4-bit by bitsandbytes, and read as it is")
        args.quantization = None
    if args.quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"--quantization {args.quantization}: not supported: Quiver's 4-bit base is bitsandbytes' "
                         "nf4 or fp4, quantized at load (--quantization nf4); a checkpoint saved 4-bit by "
                         "bitsandbytes needs no flag")
    for flags, _, changes_nothing, why, refused in VLLM_FLAGS:
        value = getattr(args, flags[0].lstrip("-").replace("-", "_"))
        if value is None:
            continue
        given = flags[0] if value is True else f"{flags[0]} {value}"
        if not changes_nothing(value, args):
            raise ValueError(f"{given}: not supported: {refused}")
        log.info("%s: vLLM's flag, accepted; it changes nothing here: %s", given, why)


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_body_bytes=args.max_request_bytes, max_prompts=args.max_prompts, max_stop=args.max_stop,
                         max_stop_chars=args.max_stop_chars, max_stop_token_ids=args.max_stop_token_ids,
                         max_name_chars=args.max_name_chars, max_bad_words=args.max_bad_words,
                         max_grammar_chars=args.max_grammar_chars, prefix_cache_scope=args.prefix_cache_scope)


def quiet_progress_bars() -> None:
    """No tqdm bars in a server's log. transformers' ("Loading weights", the GGUF conversion, which
    ignores transformers' own disable_progress_bar) and huggingface_hub's bars are all tqdm's; tqdm was
    imported (by torch) before any flag was read, too early for TQDM_DISABLE: its default is changed."""
    from functools import partialmethod

    import tqdm

    tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)


def build_server(args: argparse.Namespace) -> tuple[AsyncEngine, FastAPI]:
    """The engine (not yet running) and the HTTP app `quiver serve ARGS` serves: (AsyncEngine, FastAPI app).
    Each Ray Serve replica builds the same pair from the same flags."""
    tenants = read_keys_file(args.api_keys_file) if args.api_keys_file else []  # a bad file fails before the model
    guard = Guard(api_key=args.api_key, admin_key=args.admin_key, metrics_public=args.metrics_public,
                  max_waiting=args.max_waiting, tenants=tenants)
    adapters = startup_adapters(args)
    quiet_progress_bars()
    engine = LLMEngine(engine_config(args))
    for name, path in adapters:
        engine.load_adapter(name, path)
    if args.adapter_dir:
        engine.add_adapter_dir(args.adapter_dir)
    warm_up(engine)  # the Triton kernels compile before /health answers, not on the first requests
    async_engine = AsyncEngine(engine, Metrics(args.max_metric_adapters), request_timeout=args.request_timeout)
    app = create_app(async_engine, adapter_root=args.adapter_root or args.adapter_dir, limits=request_limits(args),
                     tool_parser=args.tool_call_parser)
    install(app, async_engine, guard)
    return async_engine, app


