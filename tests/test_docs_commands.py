"""Every command README.md and docs/*.md give a newcomer to type, run or parsed, so that a doc that drifts
from the code fails CI.

Each fenced sh/bash/shell/console block is cut into commands (continuation lines joined, comments
dropped), and each command is, by what it starts with:
- `curl`: run against a live server on a tiny model (SmolLM2's vocabulary and name, adapters `sql` and
  `chat`), port 8000 turned into the server's;
- `quiver merge`, `quiver --version`: run, on a tiny model (`--model` added where the doc uses the embedded
  SmolLM2), with the adapters the doc names made first;
- `make TARGET`: `make -n` must know the target, and the `quiver serve` line it would run must parse;
- any other `quiver ...`, `python -m quiver.bench ...`, Ray's `serve run MODULE:BUILDER k=v`, and `docker run
  ... quiver FLAGS` (the image's ENTRYPOINT with FLAGS appended): parsed by the program's own parser, stopped
  before it runs (a model load, a benchmark, Ray, a GPU): an unknown flag fails;
- in SKIP, with why it cannot run in CI.
Anything else fails the test: give it one of these. The Python blocks run against the same server, and the
first-adapter recipe in docs/adapters.md runs as it is written, on SmolLM2, in a folder where
`.venv/bin/python` and `.venv/bin/quiver` are this interpreter and this checkout's quiver."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RECIPE_HEADING = "## Train your first adapter and serve it"

# command (as its words, joined by one space) or a prefix of it ending in a space -> why CI cannot run it
SKIP = {
    "quiver serve [MODEL] [flags]": "a synopsis, not a command",
    "quiver ray serve [MODEL] [every quiver serve flag] ": "a synopsis, not a command",
    "docker build ": "builds the CUDA image: gigabytes, and network",
    "git worktree add ": "a second checkout and its venv: minutes, and network (the benchmark it serves is parsed)",
    "python3.11 -m venv .venv-gpu": "the GPU machine's environment",
    ".venv-gpu/bin/pip install ": "installs CUDA torch, for a GPU machine",
}
# Commands that fail today only for work merged alongside this test (a parse that will be accepted, a
# command that will work); each must still fail, so that it is taken out of here once that work is in.
EXPECTED_AFTER_MERGE: set[str] = set()


def doc_blocks() -> list[tuple[str, str, str]]:
    """(where, language, text) of every fenced block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            out.append((f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1), m.group(2)))
    return out


def recipe_block() -> str:
    text = (ROOT / "docs" / "adapters.md").read_text()
    assert RECIPE_HEADING in text, "docs/adapters.md lost its first-adapter recipe"
    return FENCE.search(text, text.index(RECIPE_HEADING)).group(2)


def commands(lang: str, text: str) -> list[str]:
    """The block's commands, continuation lines joined; a console block's are the lines after `$ `."""
    lines = text.replace("\\\n", " ").splitlines()
    if lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def words(command: str) -> list[str]:
    argv = shlex.split(command, comments=True)
    return argv[:-1] if argv[-1:] == ["&"] else argv


def skip_reason(argv: list[str]) -> str | None:
    joined = " ".join(argv)
    return next((why for key, why in SKIP.items() if joined == key or key.endswith(" ") and
                 joined.startswith(key)), None)


def program(argv: list[str]) -> tuple[str, list[str]] | None:
    """('quiver', args) for quiver and python -m quiver.bench; ('make' | 'curl' | 'serve run', args)."""
    name = Path(argv[0]).name
    if name == "quiver":
        return "quiver", argv[1:]
    if name.startswith("python") and argv[1:3] == ["-m", "quiver.bench"]:
        return "quiver", ["bench", *argv[3:]]
    if argv[:2] == ["docker", "run"] and "quiver" in argv:  # the image: its ENTRYPOINT, then the arguments
        entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
        return "quiver", json.loads(entrypoint)[1:] + argv[argv.index("quiver") + 1:]
    if argv[:2] == ["serve", "run"]:
        return "serve run", argv[2:]
    if name in ("make", "curl"):
        return name, argv[1:]
    return None


def all_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, words) of every command outside the recipe (which runs whole)."""
    recipe = recipe_block()
    return [(where, cmd, words(cmd)) for where, lang, text in doc_blocks() if lang in SHELLS
            and text != recipe for cmd in commands(lang, text)]


def kind(argv: list[str]) -> str:
    """How the test checks the command: skip, run, parse, make, curl, or unknown (a failure)."""
    if skip_reason(argv):
        return "skip"
    found = program(argv)
    if found is None:
        return "unknown"
    name, args = found
    if name == "quiver" and (args[:1] == ["merge"] or args in (["--version"], ["--help"])):
        return "run"
    return {"quiver": "parse", "serve run": "parse"}.get(name, name)


class Parsed(Exception):
    """Raised in place of the program's work, once its parser has accepted the arguments."""


def parse_only(name: str, args: list[str], monkeypatch) -> str | None:
    """Hand `args` to the program's own entry point with its parse_args stopped after parsing; the error
    (argparse's message) or None."""
    real = argparse.ArgumentParser.parse_known_args  # what parse_args and every subcommand's parser call

    def stop(self, args=None, namespace=None):
        parsed, unknown = real(self, args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        raise Parsed(parsed)

    def entry():
        if name == "serve run":
            module, builder = args[0].split(":")
            return getattr(importlib.import_module(module), builder)(dict(a.split("=", 1) for a in args[1:]))
        from quiver.server import cli

        if args and args[0] in cli.HANDED_OVER:  # `quiver bench`, `quiver ray`: the programs quiver becomes
            return importlib.import_module(cli.HANDED_OVER[args[0]] + ".__main__").main(args[1:])
        return cli.main(args)

    err = io.StringIO()
    with monkeypatch.context() as m, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        m.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        try:
            entry()
        except Parsed:
            return None
        except SystemExit as e:  # 0: --help, --version, a listing
            return None if e.code in (0, None) else f"exit {e.code}: {err.getvalue().strip()[-300:]}"
    return "ran without parsing its arguments"


def test_every_doc_command_is_classified_and_skips_are_used():
    cmds = all_commands()
    assert len(cmds) > 20
    unknown = [f"{where}: {cmd}" for where, cmd, argv in cmds if kind(argv) == "unknown"]
    assert not unknown, "commands the docs test does not know how to check (run, parse or SKIP them):\n" + \
        "\n".join(unknown)
    used = {key for _, _, argv in cmds for key in SKIP if skip_reason(argv) == SKIP[key]}
    assert used == set(SKIP), f"SKIP entries no doc uses any more: {set(SKIP) - used}"
    gone = EXPECTED_AFTER_MERGE - {cmd for _, cmd, _ in cmds}
    assert not gone, f"EXPECTED_AFTER_MERGE entries no doc has any more: {gone}"


def check(failures: list[str], where: str, cmd: str, error: str | None) -> None:
    if cmd in EXPECTED_AFTER_MERGE:
        if error is None:
            failures.append(f"{where}: {cmd}: works now; take it out of EXPECTED_AFTER_MERGE")
    elif error is not None:
        failures.append(f"{where}: {cmd}: {error}")


def test_quiver_and_ray_commands_parse(monkeypatch):
    failures = []
    for where, cmd, argv in all_commands():
        if kind(argv) == "parse":
            check(failures, where, cmd, parse_only(*program(argv), monkeypatch))
    assert not failures, "\n".join(failures)


def test_make_targets_exist_and_serve_what_they_say(monkeypatch):
    failures = []
    for where, cmd, argv in all_commands():
        if kind(argv) != "make":
            continue
        dry = subprocess.run(["make", "--no-print-directory", "-n", *argv[1:]], cwd=ROOT, capture_output=True,
                             text=True)
        error = f"make -n: {dry.stderr.strip()}" if dry.returncode else None
        rules = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        for goal in (a for a in argv[1:] if "=" not in a and a not in rules):  # `tests/` would pass make -n
            error = f"the Makefile has no rule {goal!r}"
        for line in dry.stdout.replace("\\\n", " ").splitlines():  # a recipe's continued lines joined
            if error is None and " serve " in line and Path(words(line)[0]).name == "quiver":
                error = parse_only("quiver", words(line)[1:], monkeypatch)
        check(failures, where, cmd, error)
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def adapter_root(api_model, tmp_path_factory):
    """The adapters the docs name, for the tiny model: sql-lora, chat-dora, a, b."""
    from peft import LoraConfig
    from peft_fixtures import make_adapter

    root = tmp_path_factory.mktemp("doc_adapters")
    for i, name in enumerate(("sql-lora", "chat-dora", "a", "b")):
        make_adapter(api_model[1], root / name, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           use_dora=name.endswith("dora")), seed=i)
    return root


@pytest.fixture(scope="module")
def doc_server(api_model, tokenizer, adapter_root):
    """The docs' server, tiny: SmolLM2's name and tokenizer, `chat` loaded, adapters found under adapter_root."""
    from helpers import LiveServer

    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=128, block_size=4,
                                    max_model_len=256, served_model_name="SmolLM2-135M-Instruct"),
                       tokenizer=tokenizer)
    engine.load_adapter("chat", str(adapter_root / "chat-dora"))
    with LiveServer(AsyncEngine(engine, Metrics()), adapter_root=adapter_root) as server:
        yield server


def on_port(text: str, port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\1:{port}", text)


def set_sql(server, loaded: bool) -> None:
    names = {m["id"] for m in json.load(urllib.request.urlopen(f"{server.url}/v1/models"))["data"]}
    if loaded and "sql" not in names:
        body = json.dumps({"name": "sql", "path": "sql-lora"}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/adapters", body,
                                                      {"content-type": "application/json"}))
    elif not loaded and "sql" in names:
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/adapters/sql", method="DELETE"))


def test_curl_commands_against_a_live_server(doc_server):
    set_sql(doc_server, loaded=False)  # docs/adapters.md's sequence loads it, lists it and unloads it
    failures = []
    for where, cmd, argv in all_commands():
        if kind(argv) != "curl":
            continue
        out = subprocess.run(["bash", "-c", on_port(cmd, doc_server.port)], capture_output=True, text=True,
                             timeout=120)
        try:
            body = json.loads(out.stdout)
            error = f"error reply: {out.stdout[:300]}" if isinstance(body, dict) and "error" in body else None
        except ValueError:
            error = f"rc {out.returncode}, not JSON: {out.stdout[:300]!r} {out.stderr[-300:]}"
        check(failures, where, cmd, error)
    assert not failures, "\n".join(failures)


def test_python_blocks_against_a_live_server(doc_server):
    """The Python snippets, in document order, sharing one namespace (README.md's defines `client`)."""
    set_sql(doc_server, loaded=True)  # as `make serve SERVE_ARGS="--adapter sql=..."` above them has it
    namespace: dict = {}
    ran = 0
    for where, lang, text in doc_blocks():
        if lang == "python":
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(on_port(text, doc_server.port), where, "exec"), namespace)
            ran += 1
    assert ran >= 3 and "client" in namespace


def test_merge_and_version_commands_run(api_model, tokenizer, adapter_root, tmp_path, monkeypatch, capsys):
    """`quiver merge` as docs/merging.md writes it, on the tiny model with SmolLM2's tokenizer (`base-dir`,
    and where the doc merges into the embedded SmolLM2), with its adapters `sql-lora`, `a`, `b`."""
    from quiver.server.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base-dir").mkdir()
    for f in api_model[0].iterdir():
        (tmp_path / "base-dir" / f.name).symlink_to(f)
    tokenizer.save_pretrained(tmp_path / "base-dir")
    for name in ("sql-lora", "a", "b"):
        (tmp_path / name).symlink_to(adapter_root / name)
    failures = []
    for where, cmd, argv in all_commands():
        if kind(argv) != "run":
            continue
        args = program(argv)[1]
        if args[:1] == ["merge"] and "--model" not in args:
            args = [*args, "--model", "base-dir"]
        try:
            main(args)
            error = None
        except SystemExit as e:
            error = None if e.code == 0 else f"exit {e.code}: {capsys.readouterr().err[-300:]}"
        if error is None and "--out" in args:
            out = tmp_path / args[args.index("--out") + 1]
            error = None if (out / "config.json").is_file() else f"wrote no model to {out}"
        check(failures, where, cmd, error)
    assert not failures, "\n".join(failures)
    assert (tmp_path / "merged-sql").is_dir()  # what the doc's next line serves


@pytest.mark.slow
def test_first_adapter_recipe_runs_as_written(smollm2_dir, tmp_path):
    """docs/adapters.md's recipe, the block as it is (only port 8000 moved to a free one): trains a LoRA on
    `quiver base-path` (SmolLM2), serves it with `quiver serve --lora-modules` and gets a completion."""
    import socket

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, run in (("python", ""), ("quiver", " -m quiver.server.cli")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    script = on_port(recipe_block(), port).replace("quiver serve ", f"quiver serve --port {port} ")
    # files, not pipes: the backgrounded server holds its output open after the script ends
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the backgrounded server, in the script's group
            os.killpg(proc.pid, signal.SIGTERM)
            for _ in range(300):
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-2000:]
    # the curl's reply: the server's access log shares the terminal (stdout)
    reply = json.loads([line for line in (tmp_path / "out").read_text().splitlines() if line.startswith("{")][-1])
    assert reply["model"] == "mine" and reply["usage"]["completion_tokens"] == 8, reply
    trained = load_file(tmp_path / "my-adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())  # PEFT starts B at zero


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the file's headings: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", FENCE.sub("", path.read_text()), re.M)}


def test_relative_links_reach_a_file_and_heading():
    """Moving a section between README.md and docs/ must keep every link to it working."""
    broken = []
    for path in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", path.read_text())):
            target, _, anchor = link.partition("#")
            if re.match(r"\w+://", link):
                continue
            file = (path.parent / target) if target else path
            if not file.exists() or anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
                broken.append(f"{path.relative_to(ROOT)}: {link}")
    assert not broken, "\n".join(broken)
