"""`quiver`: the command line. `serve` runs the server in this process; `merge` and `base-path` work on the
base offline; `bench` and `ray` are programs of their own (python -m quiver.bench, python -m
quiver.server.rayserve) that this one becomes."""
from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys

from quiver.adapters.combine import METHODS

from quiver.server.assemble import (add_engine_args, add_serve_args, build_server, log_to_stderr, startup_adapters,
                                    take_model_tag, vllm_flags)
from quiver.server.engine.public import DTYPES

# quiver's commands that are programs of their own: `quiver NAME ARGS` becomes `python -m MODULE ARGS`
HANDED_OVER = {"bench": "quiver.bench", "ray": "quiver.server.rayserve"}
# past --shutdown-grace the engine ends what is still running (503s, error events: AsyncEngine.drain); uvicorn
# cancels what is left this much later, which is only a request that never reached the engine
CANCEL_AFTER_GRACE_S = 5.0


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


def open_access(args: argparse.Namespace) -> str | None:
    """The start-up warning for a server reachable beyond this machine with no key (not refused: the
    image and the tests listen on 0.0.0.0 behind their own network)."""
    if any(getattr(args, flag, None) for flag in ("api_key", "api_keys_file")):
        return None
    try:
        if args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback:
            return None
    except ValueError:  # a host name: it may be reached from anywhere
        pass
    return (f"--host {args.host} with no --api-key or --api-keys-file: anyone who can reach port {args.port} can "
            "generate, and load and unload adapters")


def serve(args: argparse.Namespace) -> None:
    import signal
    import threading

    import uvicorn

    log = logging.getLogger(__name__)
    sock = listen_socket(args.host, args.port)
    if (warning := open_access(args)) is not None:
        log.warning(warning)
    async_engine, app = build_server(args)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.uvicorn_log_level or args.log_level.lower(),
                                           timeout_graceful_shutdown=args.shutdown_grace + CANCEL_AFTER_GRACE_S))
    http = threading.Thread(target=server.run, args=([sock],), name="quiver-http", daemon=True)

    def shutdown(signum, _):
        if async_engine.draining:  # a second signal: stop now
            server.force_exit = True
            async_engine.stop()
            return
        log.info("%s: draining (up to %g s), then exiting", signal.Signals(signum).name, args.shutdown_grace)
        async_engine.drain(args.shutdown_grace)  # new requests get 503, those left after the grace period too
        server.should_exit = True  # uvicorn stops listening and waits for the rest

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


def unrecognized(argv: list[str], unknown: list[str], model_tag: str | None) -> list[str]:
    """The unknown arguments as typed: argparse takes an unknown flag's value for MODEL, so it is put back
    after its flag (`--foo 1` is refused as such, never served as the model "1")."""
    shown = []
    for i, arg in enumerate(argv):
        if arg in unknown or (arg == model_tag and i and argv[i - 1] in unknown and argv[i - 1].startswith("-")
                                  and "=" not in argv[i - 1]):
            shown.append(arg)
    return shown


def base_path(args: argparse.Namespace) -> None:
    """The base as the HF folder `quiver serve` reads (the embedded GGUF converted once, as serve does), so
    that adapters are trained on exactly the weights they will be served over."""
    from quiver.server.model.checkpoint import resolve_model

    take_model_tag(args)
    print(resolve_model(args.model)[0].resolve())


DISTRIBUTION = "quiver-serve"  # [project] name in pyproject.toml


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import version

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in HANDED_OVER:  # before parsing: every flag after the name (--help too) is theirs
        os.execv(sys.executable, [sys.executable, "-m", HANDED_OVER[argv[0]], *argv[1:]])
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
    b = sub.add_parser("base-path", help="print the served base model's HF folder (to train adapters on)")
    b.add_argument("model_tag", nargs="?", metavar="MODEL", help="a model folder or .gguf (default: the embedded "
                                                                 "SmolLM2, converted once into the cache)")
    b.add_argument("--model", default=None, help="the same as MODEL")
    sub.add_parser("bench", help="run a benchmark (python -m quiver.bench NAME ...)", add_help=False)
    p = sub.add_parser("serve", help="serve the OpenAI-style HTTP API")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the same as --model (as in `vllm serve MODEL`)")
    p.add_argument("--version", action="version", version=version(DISTRIBUTION))
    add_engine_args(p)
    add_serve_args(p)
    sub.add_parser("ray", help="scale out on Ray Serve", add_help=False)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"quiver {args.command}: error: unrecognized arguments: "
                       f"{' '.join(unrecognized(argv, unknown, getattr(args, 'model_tag', None)))}\n")
    log_to_stderr(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "serve":
            take_model_tag(args)
            vllm_flags(args)
            startup_adapters(args)  # a bad flag is an error before the port is taken
            serve(args)
        elif args.command == "merge":
            merge(args)
        elif args.command == "base-path":
            base_path(args)
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        parser.exit(2, f"quiver {args.command}: error: {exc}\n")


if __name__ == "__main__":
    main()
