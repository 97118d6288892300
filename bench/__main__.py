"""python -m bench <name> [...]: run one benchmark."""
from __future__ import annotations

import sys


def main() -> None:
    names = {"latency": "bench.latency", "adapters": "bench.adapters", "peft": "bench.peft",
             "serving": "bench.serving", "throughput": "bench.throughput", "families": "bench.families",
             "hotload": "bench.hotload"}
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m bench {{{','.join(names)}}} [options]")
    import importlib
    importlib.import_module(names[sys.argv[1]]).main(sys.argv[2:])


main()
