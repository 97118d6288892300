"""`quiver ray serve ...` (quiver's `ray` command becomes this program): python -m quiver.server.rayserve serve ..."""
from __future__ import annotations

import argparse

from quiver.server.assemble import log_to_stderr, startup_adapters, take_model_tag, vllm_flags
from quiver.server.rayserve.app import add_ray_serve_args, serve_forever


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quiver ray")
    commands = parser.add_subparsers(dest="ray_command", required=True)
    add_ray_serve_args(commands.add_parser("serve", help="quiver serve's engine as Ray Serve replicas behind one "
                                                         "OpenAI ingress (needs quiver-serve[ray])"))
    args = parser.parse_args(argv)
    log_to_stderr(args.log_level)
    try:
        take_model_tag(args)
        vllm_flags(args)
        startup_adapters(args)  # a bad flag is an error before Ray starts
        serve_forever(args)
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        parser.exit(2, f"quiver ray {args.ray_command}: error: {exc}\n")


if __name__ == "__main__":
    main()
