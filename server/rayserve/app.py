"""`quiver ray serve`: the Ray Serve application, and starting it on a local or an existing Ray cluster.

`serve run quiver.server.rayserve.app:app_builder model=... replicas=2` builds the same application
from `key=value` arguments (the flags' names), for Serve's own CLI and config files.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets

from quiver.server.assemble import add_engine_args, add_serve_args, engine_config, take_model_tag, vllm_flags

log = logging.getLogger(__name__)
APP_NAME = "quiver"
INGRESS_MAX_ONGOING = 4096  # the ingress only relays bytes; the replicas' limits are what bound the work
INGRESS_EXTRA_GRACE_S = 10.0  # the ingress outlives the replicas' grace: a stream they cut off gets its error event


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=1, help="engine replicas, each one base model on one device")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (env RAY_ADDRESS); default: start a local one, on loopback when "
                        "--host is")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (0 lets replicas share cores)")
    p.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="GPUs Ray reserves for each replica (default: 1 with --device cuda, else 0)")
    p.add_argument("--max-adapters-per-replica", type=int, default=None,
                   help="adapters Serve's router treats as warm on one replica, least recently used first out "
                        "(default: --max-cpu-loras, else 64); a request for an adapter warm nowhere goes to the "
                        "replica holding the fewest")


def build_app(args: argparse.Namespace):
    """The Serve application: `--replicas` QuiverEngine replicas behind one OpenAIIngress."""
    from quiver.server.rayserve.deployments import OpenAIIngress, QuiverEngine

    config = engine_config(args)  # the replicas' batch capacity, with the device's defaults filled in
    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = 1 if config.device.startswith("cuda") else 0
    max_adapters = args.max_adapters_per_replica or config.max_cpu_loras or 64
    engine = QuiverEngine.options(
        num_replicas=args.replicas,
        # up to a full batch per replica: requests for several adapters share its steps, and beyond it a hot
        # adapter spills to other replicas instead of queueing behind its own
        max_ongoing_requests=config.max_num_seqs,
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": gpus},
        graceful_shutdown_timeout_s=args.shutdown_grace,
        graceful_shutdown_wait_loop_s=min(2.0, args.shutdown_grace),
    ).bind(args, max_adapters)
    return OpenAIIngress.options(num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,  # it owns the catalog
                                 ray_actor_options={"num_cpus": 0},
                                 graceful_shutdown_timeout_s=args.shutdown_grace + INGRESS_EXTRA_GRACE_S).bind(engine)


def start(args: argparse.Namespace, ray_init: dict | None = None):
    """Join or start Ray, start Serve's HTTP proxy on --host/--port, deploy; return the ingress's handle."""
    connect(args, ray_init)
    return deploy(args)


def connect(args: argparse.Namespace, ray_init: dict | None = None) -> None:
    """Join --ray-address's cluster, or start a local one: on loopback when --host is (every Ray listener on
    127.0.0.1), sending no usage statistics and writing no auth token to the home directory."""
    local = not args.ray_address
    loopback = local and args.host in ("127.0.0.1", "localhost")
    if local:  # read when ray is first imported
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # in memory, not ~/.ray/auth_token
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # single-node mode: no outward address
    try:
        import ray
        from ray import serve  # noqa: F401 (an install without Serve fails here, before Ray starts)
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise ValueError("Ray Serve is not installed: pip install 'quiver-serve[ray]'") from None

    if not ray.is_initialized():
        options = {"address": args.ray_address} if not local else {"include_dashboard": False, "log_to_driver": False}
        if loopback:
            options["_node_ip_address"] = "127.0.0.1"
        ray.init(**options | (ray_init or {}))


def deploy(args: argparse.Namespace):
    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port})
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/")


def drain(grace: float) -> None:
    """Stop taking requests and let the running ones finish: the ingress answers 503 and waits up to `grace`
    seconds (--shutdown-grace) for them; deleting the application then gives a request still running on a
    replica that replica's own grace before Serve ends it (a stream gets an error event)."""
    import time

    from ray import serve

    serve.get_deployment_handle("OpenAIIngress", app_name=APP_NAME).drain.remote(grace).result()
    serve.delete(APP_NAME, _blocking=False)
    deadline = time.monotonic() + grace + INGRESS_EXTRA_GRACE_S + 30
    while APP_NAME in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


class StopNow(Exception):
    """A second SIGINT/SIGTERM while draining: stop without waiting for the running requests."""


def serve_forever(args: argparse.Namespace) -> None:
    """`quiver ray serve`: start, serve until SIGINT/SIGTERM, drain (up to --shutdown-grace), then shut Serve
    and Ray down and return. A second signal stops at once."""
    import signal
    import threading

    received = []
    done = threading.Event()

    def on_signal(signum, _):
        if received:
            raise StopNow
        received.append(signal.Signals(signum).name)
        done.set()

    connect(args)
    # after ray.init, which installs its own SIGTERM handler (sys.exit; a native one logs `*** SIGTERM
    # received` as a crash): signal.signal sets the process's handler, taking the signals back
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        deploy(args)  # a signal meanwhile is served once the replicas are up; a second one stops at once
        log.info("serving on http://%s:%d through Ray Serve, %d replica(s)", args.host, args.port, args.replicas)
        while not done.wait(0.5):  # polled: a signal that lands on one of Ray's threads does not wake a wait
            pass
        log.info("%s: draining (up to %g s), then exiting", received[0], args.shutdown_grace)
        drain(args.shutdown_grace)
    except StopNow:
        log.info("stopping now")
    finally:
        stop()


def add_ray_serve_args(p: argparse.ArgumentParser) -> None:
    """`quiver serve`'s arguments, and where the replicas run."""
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the same as --model")
    add_engine_args(p)
    add_serve_args(p)
    add_ray_args(p)


def app_builder(args: dict):
    """For `serve run quiver.server.rayserve.app:app_builder key=value ...`: the flags without their dashes
    (model=/path, replicas=2, adapter_dir=/adapters, metrics_public=true); an unknown key is an error, as a
    flag is."""
    argv = []
    for key, value in args.items():
        flag = f"--{key.replace('_', '-')}"
        if str(value).lower() in ("true", "false"):
            argv += [flag] if str(value).lower() == "true" else []
        else:
            argv += [flag, str(value)]
    p = argparse.ArgumentParser(prog="serve run quiver.server.rayserve.app:app_builder")
    add_ray_serve_args(p)
    ns = p.parse_args(argv)
    take_model_tag(ns)
    vllm_flags(ns)
    return build_app(ns)
