"""What the benchmarks share: the machine and versions they record, where results go (--out), the --device /
--dtype options and the GPU memory figures, quiet third-party output, and an in-process server on loopback
(the tests use it too)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import socket
import threading
import time
import warnings
from pathlib import Path

# results without --out: this folder in the directory the bench runs in. The checkout's bench/results holds the
# published figures (docs/benchmarks.md): only an explicit --out bench/results rewrites them.
RESULTS = "quiver-bench-results"
BASE = "base"  # label of requests that name no adapter


def machine() -> dict:
    import torch
    import transformers
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def add_device_args(ap: argparse.ArgumentParser) -> None:
    """--device and --dtype, for the engines, their peers (transformers / PEFT) and the tensors a bench makes."""
    from quiver.server.engine.config import DTYPES

    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", choices=DTYPES, default="auto",
                    help="auto: as quiver serve picks it (bfloat16 on CPUs with AVX512-BF16/AMX, else float32; "
                         "the checkpoint's dtype on a GPU)")


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what the result files record)."""
    return str(dtype).removeprefix("torch.")


def cuda_peak(device) -> dict:
    """{"cuda_max_memory_allocated_mib": ...} on a CUDA device (the peak of torch's allocator), else {}."""
    if not is_cuda(device):
        return {}
    import torch
    return {"cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def release(device) -> None:
    """Between phases that load different models: collect garbage and, on CUDA, return the cached memory."""
    gc.collect()
    if is_cuda(device):
        import torch
        torch.cuda.empty_cache()


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if is_cuda(device):
        import torch
        torch.cuda.synchronize(device)


def decode_step_ms(engine, rows: int, prompt_tokens: int, params, seed: int) -> list[float]:
    """Prefill `rows` random prompts, then time each decode step until all finish (ms; the first and
    last steps, which mix in prefill and retirement, left out). params(i) -> row i's SamplingParams."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for i in range(rows):
        engine.add_request(torch.randint(100, 20000, (prompt_tokens,), generator=g).tolist(), params(i))
    while any(s.num_computed < s.num_tokens - 1 for s in engine.seqs.values()):
        engine.step()
    times = []
    while engine.has_work():
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        times.append((time.perf_counter() - t0) * 1000)
    return times[1:-1]


def add_out_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results folder (default: ./{RESULTS} in the current directory; --out bench/results "
                         "rewrites the published figures of docs/benchmarks.md)")


def results_dir(out: str | Path | None = None) -> Path:
    """--out, else ./quiver-bench-results (absolute, so that what a bench prints says where to look)."""
    return Path(out or RESULTS).absolute()


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    out_dir = results_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def quiet_third_party() -> None:
    """Keep a benchmark's output its own: no transformers / huggingface_hub progress bars ("Loading weights",
    "Writing model shards", downloads), no transformers warnings or FutureWarnings, no bitsandbytes notice
    that its optional CPU kernel package is missing. The GGUF conversion calls tqdm directly, and tqdm read
    TQDM_DISABLE when torch imported it: its default is changed. The environment carries the same to the
    servers and workers a benchmark starts."""
    from functools import partialmethod

    import huggingface_hub.utils
    import tqdm
    from transformers.utils import logging as transformers_logging

    os.environ.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                      TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)
    huggingface_hub.utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch", "bitsandbytes", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


class LoopbackServer:
    """The HTTP app under uvicorn on a free loopback port, in a daemon thread; the engine loop on its own."""

    def __init__(self, async_engine, adapter_root=None, guard=None, limits=None):
        import uvicorn

        from quiver.server.http.app import create_app
        from quiver.server.http.guard import install

        self.async_engine = async_engine
        self.engine = async_engine.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(async_engine, adapter_root=adapter_root, **({} if limits is None else {"limits": limits}))
        if guard is not None:
            install(app, async_engine, guard)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                timeout_keep_alive=60)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="quiver-http", daemon=True)

    def __enter__(self):
        self.async_engine.start()
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.async_engine.stop()

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.has_work() or self.async_engine.num_waiting():
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine did not go idle within {timeout:g} s")
            time.sleep(0.02)

    def on_engine(self, fn):
        """Run fn(engine) on the engine thread between two steps; its result, or its exception."""
        return asyncio.run(self.async_engine.call(fn))


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation, as numpy) and mean; None when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs = sorted(values)

    def q(p: float) -> float:
        pos = p / 100 * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": sum(xs) / len(xs)}
