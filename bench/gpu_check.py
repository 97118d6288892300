"""make gpu-check: everything a lent GPU machine should run, in one pass under a global deadline, on that
machine's own python3 (its CUDA torch, Triton, transformers, PEFT, pytest: never installed here).

Steps, most valuable first: the environment; every CUDA test (the Triton kernels against their torch
references, the engine on the GPU against PEFT for every family, the 4-bit base; one line per test, no
stop at the first failure, a per-test timeout where pytest-timeout is present); the random model the
benchmarks use (SmolLM2's shapes, random token ids, built outside the results folder); the kernel
benchmark (µs and GB/s against the device's copy bandwidth); decode tokens/s in bf16 at batch 32, 1 and
8 with 1/8/32 adapters against the base and PEFT; TTFT/TPOT merged against unmerged; NF4 against bf16.

Each step runs in its own process group, its output streamed to logs/<step>.log, and is killed (group and
all) at min(its limit, the time left to the deadline). gpu-check.json and gpu-check.md (one table) are
rewritten after every step, and gpu-check.tgz bundles the logs and figures, so a run cut short still
returns everything done so far. A step that needs a package the machine lacks is skipped by name.

    python3 bench/gpu_check.py [--out DIR] [--deadline S] [--dry]      (or: make gpu-check [DRY=1])

--dry proves the plan on any machine: the tests step collects the CUDA tests with the GPU machine's
missing packages blocked, every other step is a stand-in process (one can be made to hang: --dry-hang).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/test_kernels_lora.py", "tests/test_kernels_attention.py", "tests/test_nf4_triton.py",
              "tests/test_gpu.py", "tests/test_qlora_gpu.py", "tests/test_warmup.py"]
# what the GPU machine's python3 lacks (make gpu-wheels carries them); --dry blocks them
GPU_MACHINE_LACKS = ("fastapi", "starlette", "pydantic", "uvicorn", "llguidance", "bitsandbytes", "gguf")
VERSIONS = ("torch", "triton", "transformers", "peft", "pytest", *GPU_MACHINE_LACKS)
DEFAULT_DEADLINE = 420


@dataclass
class Step:
    name: str
    argv: list[str]
    limit: float  # seconds, before the deadline caps it
    needs: tuple[str, ...] = ()  # modules it imports: skipped by name when one is missing
    figures: str | None = None  # folder (under the results) whose JSON files are its figures


@dataclass
class Check:
    out: Path  # gpu-check.json, .md and .tgz
    logs: Path  # one log per step (default out/logs)
    figures: Path  # each step's own JSON and plots, kept out of `out` (the JSON holds the figures)
    deadline: float  # time.monotonic() at which everything must have ended
    result: dict = field(default_factory=dict)


def bootstrap() -> Path:
    """Put this checkout on the path as the `quiver` namespace (not installed on a GPU machine): a folder of
    links, prepended to sys.path and to the children's PYTHONPATH (appended to, never replaced). bench/
    itself leaves sys.path: its modules (kernels, models, common) would shadow packages of those names."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ns = ROOT / ".gpu-check"
    (ns / "quiver").mkdir(parents=True, exist_ok=True)
    for part in ("server", "kernels", "adapters", "bench"):
        link = ns / "quiver" / part
        if not link.exists():
            link.symlink_to(ROOT / part, target_is_directory=True)
    sys.path.insert(0, str(ns))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ns), os.environ.get("PYTHONPATH")) if p)
    return ns


def install_wheels(wheels: Path, site: Path) -> str:
    """The wheels of make gpu-wheels, installed into `site` (put on the path) with the machine's own pip,
    no index, no dependencies: the packages the machine lacks, without touching its environment."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return f"no wheels in {wheels}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)],
                          capture_output=True, text=True)
    if done.returncode:
        return f"pip install of {len(found)} wheels failed: {(done.stdout + done.stderr).strip()[-500:]}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join((str(site), os.environ["PYTHONPATH"]))
    importlib.invalidate_caches()
    return f"installed {len(found)} wheels from {wheels} into {site}"


def missing(modules, blocked=()) -> list[str]:
    return [m for m in modules if m in blocked or importlib.util.find_spec(m) is None]


def plan(args, work: Path, figures: Path, blocked: tuple[str, ...]) -> list[Step]:
    py, bench = sys.executable, [sys.executable, "-m", "quiver.bench"]
    model = str(work / f"model-{args.shape}")
    gpu = ["--device", args.device, "--dtype", "bfloat16", "--model", model]
    timeout = ["--timeout", "120"] if not missing(["pytest_timeout"]) else []
    workers = ["-n", "4"] if not missing(["xdist"]) else []
    tests = [py, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
             *timeout, *workers, *CUDA_TESTS]
    if args.dry:  # collect only, as the GPU machine would, without its missing packages
        tests = [py, "-c", f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r}));"
                           f"import pytest; sys.exit(pytest.main({tests[3:]!r} + ['--collect-only']))"]
    steps = [
        Step("tests", tests, 200),
        Step("model", [py, "-c", "import sys; from quiver.bench.models import random_model as m; m(sys.argv[1], "
                                 "sys.argv[2])", model, args.shape], 90, ("transformers",)),
        Step("kernels", [*bench, "kernels", "--device", args.device, "--out", str(figures / "kernels")], 45,
             figures="kernels"),
        Step("batch32", [*bench, "adapters", *gpu, "--batch", "32", "--adapters", "1", "8", "32", "--new-tokens",
                         "32", "--out", str(figures / "batch32")], 75, ("peft",), "batch32"),
        Step("batch1", [*bench, "adapters", *gpu, "--batch", "1", "--adapters", "1", "--new-tokens", "32",
                        "--out", str(figures / "batch1")], 45, ("peft",), "batch1"),
        Step("batch8", [*bench, "adapters", *gpu, "--batch", "8", "--adapters", "1", "8", "--new-tokens", "32",
                        "--out", str(figures / "batch8")], 45, ("peft",), "batch8"),
        Step("latency", [*bench, "latency", *gpu, "--concurrency", "1", "8", "32", "--repeats", "1",
                         "--new-tokens", "32", "--out", str(figures / "latency")],
             60, ("peft",), "latency"),
        Step("quantized", [*bench, "quantized", *gpu, "--rounds", "1", "--out", str(figures / "quantized")], 60,
             ("bitsandbytes",), "quantized"),
    ]
    if args.dry:
        for s in steps[1:]:
            s.argv = [py, "-c", STAND_IN, s.name, str(args.out / "gpu-check.json"),
                      str(figures / (s.figures or s.name)), str(s.name == args.dry_hang)]
    return steps


# a dry run's stand-in for a step: says what it saw of the JSON so far, starts a grandchild (which the
# group kill must end), writes a figure, and hangs when asked to
STAND_IN = """
import json, os, subprocess, sys, time
name, summary, figures, hang = sys.argv[1:]
done = list(json.load(open(summary))["steps"]) if os.path.exists(summary) else []
print(f"{name}: the summary holds {done}", flush=True)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"{name}: grandchild {child.pid}", flush=True)
os.makedirs(figures, exist_ok=True)
json.dump({"step": name}, open(os.path.join(figures, name + ".json"), "w"))
time.sleep(600 if hang == "True" else 0.05)
child.kill()
"""


def run(step: Step, check: Check, blocked: tuple[str, ...]) -> dict:
    """One step in its own process group, output streamed to its log, killed whole at its limit."""
    log = check.logs / f"{step.name}.log"
    lacking = missing(step.needs, blocked)
    left = check.deadline - time.monotonic()
    if lacking or left < 5:
        reason = f"needs {', '.join(lacking)}" if lacking else "the deadline was reached"
        log.write_text(f"skipped: {reason}\n")
        print(f"{step.name:10s} skipped: {reason}", flush=True)
        return {"returncode": None, "skipped": reason, "seconds": 0}
    limit = min(step.limit, left)
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as sink:
        # the benchmarks run from the work folder: nothing of the checkout's top level on their path
        proc = subprocess.Popen(step.argv, cwd=ROOT if step.name == "tests" else check.figures, stdout=sink,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            stop_group(proc)
            with open(log, "a") as note:
                note.write(f"\n[gpu-check] killed at its limit of {limit:.0f} s\n")
    text = log.read_text(errors="replace")
    tail = text.strip().splitlines()[-40:]
    took = round(time.monotonic() - t0, 1)
    print(f"{step.name:10s} rc={rc} {took:6.1f} s  {tail[-1] if tail else ''}", flush=True)
    record = {"command": step.argv, "returncode": rc, "seconds": took, "limit": round(limit, 1), "tail": tail}
    outcomes = dict(m[::-1] for m in OUTCOME.findall(text)) | dict(OUTCOME_AFTER.findall(text))
    return record | ({"tests": outcomes} if outcomes else {})


# pytest -v's one line per test: "tests/x.py::t[p] PASSED", or with xdist "[gw0] [ 5%] PASSED tests/x.py::t[p]"
OUTCOME_AFTER = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)
OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+)", re.M)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, SIGKILL to all of it 5 s later (the group outlives its
    leader while any descendant is alive)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def save(check: Check) -> None:
    """gpu-check.json, gpu-check.md and gpu-check.tgz, each replaced whole (a reader never sees half)."""
    from quiver.bench.gpu_report import table

    out = check.out
    for name, text in (("gpu-check.json", json.dumps(check.result, indent=1, default=str)),
                       ("gpu-check.md", table(check.result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    tmp = out / ".gpu-check.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in (check.logs, check.figures):
            tar.add(folder, folder.name)
    os.replace(tmp, out / "gpu-check.tgz")


def environment(blocked) -> dict:
    """Versions, the GPU, and which of the packages it may lack the machine has."""
    env = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in VERSIONS:
        env[name] = "blocked (--dry)" if name in blocked else None
        if name not in blocked and importlib.util.find_spec(name) is not None:
            try:
                env[name] = getattr(__import__(name), "__version__", "present")
            except Exception as exc:  # noqa: BLE001 (a broken install is a finding, not a crash)
                env[name] = f"import fails: {exc}"
    import torch

    env["cuda"] = torch.cuda.is_available()
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT if set, else "
                    "bench/results/gpu-check)")
    ap.add_argument("--logs", type=Path, default=None, help="one log per step (default OUT/logs)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quiver-gpu-check",
                    help="where the random model and each step's own files go (kept out of the results)")
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds for the whole check")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels to install first (make gpu-wheels)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="smollm2-135m", help="model shapes for the benchmarks (bench.models)")
    ap.add_argument("--skip", nargs="*", default=[], help="steps not to run")
    ap.add_argument("--dry", action="store_true", help="prove the plan with stand-in steps (any machine)")
    ap.add_argument("--dry-hang", default=None, help="with --dry: the step whose stand-in hangs")
    args = ap.parse_args(argv)
    start = time.monotonic()
    bootstrap()
    out = args.out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT")
                                  else ROOT / "bench" / "results" / "gpu-check")
    check = Check(out, args.logs or out / "logs", args.work / "figures", start + args.deadline)
    for folder in (out, check.logs, check.figures):
        folder.mkdir(parents=True, exist_ok=True)
    blocked = GPU_MACHINE_LACKS if args.dry else ()
    wheels = "not installed (--dry)" if args.dry else install_wheels(args.wheels, args.work / "site")
    steps = [s for s in plan(args, args.work, check.figures, blocked) if s.name not in args.skip]
    check.result = {"deadline_s": args.deadline, "dry": args.dry, "wheels": wheels, "environment": environment(blocked),
                    "plan": [{"step": s.name, "limit_s": s.limit, "needs": list(s.needs)} for s in steps],
                    "steps": {}, "finished": False}
    save(check)
    print(json.dumps(check.result["environment"]), flush=True)
    for step in steps:
        record = run(step, check, blocked)
        folder = check.figures / step.figures if step.figures else None
        for found in sorted(folder.glob("*.json")) if folder and folder.is_dir() else []:
            record["figures"] = json.loads(found.read_text())
        check.result["steps"][step.name] = record
        save(check)
    ran = [s for s in check.result["steps"].values() if not s.get("skipped")]
    check.result.update(finished=True, seconds=round(time.monotonic() - start, 1),
                        passed=all(s["returncode"] == 0 for s in ran))
    save(check)
    print(f"wrote {out / 'gpu-check.json'} ({'every step run passed' if check.result['passed'] else 'SOME FAILED'})")
    print((out / "gpu-check.md").read_text())
    return check.result


if __name__ == "__main__":
    main()
