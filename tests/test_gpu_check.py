"""make gpu-check DRY=1 on this machine: the plan fits the deadline, the CUDA tests collect without the GPU
machine's missing packages, a step hung past its limit is killed with its whole process group and leaves
a readable log, and the summary is rewritten after every step."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 30


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has ended


@pytest.mark.slow
def test_dry_run_proves_the_plan(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--dry-hang", "batch8",
                           "--deadline", str(DEADLINE), "--out", str(out), "--logs", str(logs),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=DEADLINE + 60)
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    assert took < DEADLINE + 20  # the deadline holds (the last kill takes up to 5 s more, start-up a few)
    result = json.loads((out / "gpu-check.json").read_text())
    steps = result["steps"]
    assert [p["step"] for p in result["plan"]] == list(steps) == [
        "tests", "model", "kernels", "batch32", "batch1", "batch8", "latency", "quantized"]
    assert result["finished"] and not result["passed"]  # batch8 hung
    # the CUDA tests collect, bitsandbytes and the server's packages blocked as on the GPU machine
    assert steps["tests"]["returncode"] == 0
    assert re.search(r"\d+ tests? collected", steps["tests"]["tail"][-1]), steps["tests"]["tail"]
    assert not any("error" in line.lower() for line in steps["tests"]["tail"]), steps["tests"]["tail"]
    # every step ran, was killed at the deadline, or was skipped by name: none failed for a missing package
    for name in ("model", "kernels", "batch32", "batch1"):
        assert steps[name]["returncode"] == 0, (name, steps[name])
        assert steps[name].get("figures", {"step": name}) == {"step": name}  # what its stand-in wrote
    assert steps["quantized"]["skipped"] == "needs bitsandbytes"
    assert steps["latency"]["skipped"] == "the deadline was reached"
    assert sum(s["seconds"] for s in steps.values()) <= DEADLINE + 1
    # the hung step: killed at what was left, a readable log, its grandchild gone, the JSON it saw at its start
    hung = steps["batch8"]
    assert hung["returncode"] == "timeout" and hung["limit"] < 45
    log = (logs / "batch8.log").read_text()
    assert "killed at its limit" in log and "b'" not in log
    assert "the summary holds ['tests', 'model', 'kernels', 'batch32', 'batch1']" in log
    grandchild = int(re.search(r"grandchild (\d+)", log).group(1))
    assert not alive(grandchild)
    assert "| batch8 | rc timeout |" in (out / "gpu-check.md").read_text()
    assert {"logs/batch8.log", "logs/tests.log"} <= set(
        __import__("tarfile").open(out / "gpu-check.tgz").getnames())
