"""The command line: flags reach the engine config, vLLM's spellings work, bad values are one-line errors."""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from quiver.server import cli
from quiver.server.assemble import VLLM_FLAGS, add_engine_args, engine_config, parse_adapters, startup_adapters
from quiver.server.cli import main


def test_flags_reach_engine_config():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = engine_config(p.parse_args(["--max-loras", "3", "--max-lora-rank", "32", "--dtype", "bfloat16",
                                      "--lora-starvation-steps", "5", "--num-kv-blocks", "10"]))
    assert (cfg.max_loras, cfg.max_lora_rank, cfg.dtype, cfg.lora_starvation_steps, cfg.num_kv_blocks) == \
        (3, 32, "bfloat16", 5, 10)
    assert cfg.enable_prefix_caching and cfg.quantization is None
    for off in ("--no-prefix-caching", "--no-enable-prefix-caching"):
        assert not engine_config(p.parse_args([off])).enable_prefix_caching
    cfg = engine_config(p.parse_args(["--quantization", "fp4", "--no-double-quant", "--quantize-embeddings"]))
    assert (cfg.quantization, cfg.double_quant, cfg.quantize_embeddings) == ("fp4", False, True)
    assert cfg.huge_pages and not engine_config(p.parse_args(["--no-huge-pages"])).huge_pages


def test_parse_adapters():
    assert parse_adapters(["a=/x", "b=rel/y=z"]) == [("a", "/x"), ("b", "rel/y=z")]
    for bad in ("noequals", "=path", "name="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            parse_adapters([bad])


def test_bad_adapter_flag_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--adapter", "oops"])
    assert e.value.code == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal a machine without CUDA gives")
def test_cuda_device_without_cuda_exits_with_one_line(tiny_models, capsys):
    model_dir, _ = tiny_models["llama_gqa"]
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(model_dir), "--device", "cuda", "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no CUDA device" in err and len(err.splitlines()) == 1, err


def parsed_serve(argv: list[str], monkeypatch) -> argparse.Namespace:
    """What `quiver ARGV` hands to serve (which is not run)."""
    seen = []
    monkeypatch.setattr(cli, "serve", seen.append)
    main(argv)
    return seen[0]


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_model_as_an_argument_as_in_vllm_serve(monkeypatch, capsys):
    assert parsed_serve(["serve", "/m/x.gguf"], monkeypatch).model == "/m/x.gguf"
    assert parsed_serve(["serve", "--port", "9000", "/m/dir", "--max-loras", "2"], monkeypatch).model == "/m/dir"
    assert parsed_serve(["serve", "/m/dir", "--model", "/m/dir"], monkeypatch).model == "/m/dir"
    assert parsed_serve(["serve"], monkeypatch).model is None  # the embedded default
    err = one_line_error(["serve", "/m/a", "--model", "/m/b"], capsys)
    assert err == "quiver serve: error: the model is given twice, as '/m/a' and as --model '/m/b'"


def test_lora_modules_as_vllm_takes_them(monkeypatch):
    args = parsed_serve(["serve", "--lora-modules", "a=/x", "b=/y=z", "--adapter", "c=/w", "--lora-modules",
                         '{"name": "d", "path": "/v", "base_model_name": "m"}', '{"name": "e", "path": "/u"}'],
                        monkeypatch)
    assert startup_adapters(args) == [("c", "/w"), ("a", "/x"), ("b", "/y=z"), ("d", "/v"), ("e", "/u")]


@pytest.mark.parametrize("item, needle", [
    ("sql", 'expects NAME=PATH or JSON {"name": ..., "path": ...}, got \'sql\''),
    ("=/x", "expects NAME=PATH"),
    ('{"name": "sql", "path": "/x"', "is not valid JSON"),
    ('{"name": "sql"}', 'needs "name" and "path" strings'),
    ('{"name": "sql", "path": 3}', 'needs "name" and "path" strings'),
    ('{"name": "sql", "path": "/x", "rank": 8}', "unknown field(s) rank"),
])
def test_bad_lora_modules_item_is_one_line(item, needle, capsys):
    err = one_line_error(["serve", "--lora-modules", "ok=/x", item], capsys)
    assert err.startswith("quiver serve: error: --lora-modules") and needle in err, err


def test_an_adapter_named_twice_is_one_line(capsys):
    err = one_line_error(["serve", "--adapter", "a=/x", "--lora-modules", "a=/y"], capsys)
    assert "adapter 'a' is given twice" in err


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version_is_the_installed_distributions(argv, capsys):
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert cli.DISTRIBUTION == project["name"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and capsys.readouterr().out.strip() == project["version"]


def test_invalid_device_string_is_one_line(tiny_models, capsys):
    err = one_line_error(["serve", str(tiny_models["llama_gqa"][0]), "--device", "cuda:x", "--port", "0"], capsys)
    assert err.startswith("quiver serve: error: --device cuda:x: "), err


@pytest.mark.parametrize("argv, program", [
    (["ray", "serve", "--adapter", "a=/x"], ["-m", "quiver.server.rayserve", "serve", "--adapter", "a=/x"]),
    (["ray", "--help"], ["-m", "quiver.server.rayserve", "--help"]),
    (["bench", "latency", "--help"], ["-m", "quiver.bench", "latency", "--help"]),
])
def test_ray_and_bench_are_programs_quiver_becomes(argv, program, monkeypatch):
    """`quiver ray ...` and `quiver bench ...` replace this process (so a signal to it reaches them) with
    their own program, every argument after the name handed on as it is."""
    became = []

    def execv(path, args):
        became.append((path, args))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execv", execv)
    with pytest.raises(SystemExit):
        main(argv)
    assert became == [(sys.executable, [sys.executable, *program])]


def test_quiver_ray_serve_help_and_one_line_errors(capsys):
    from quiver.server.rayserve.__main__ import main as ray_main

    for argv, usage in ((["--help"], "usage: quiver ray "), (["serve", "--help"], "usage: quiver ray serve ")):
        with pytest.raises(SystemExit) as e:
            ray_main(argv)
        assert e.value.code == 0 and capsys.readouterr().out.startswith(usage)
    with pytest.raises(SystemExit) as e:
        ray_main(["serve", "--adapter", "oops"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "quiver ray serve: error: --adapter expects NAME=PATH, got 'oops'"


# The `vllm serve` commands of vLLM's "LoRA Adapters" page (docs/features/lora.md), as printed there; a test swaps
# in its own model and adapter paths (VLLM_MODEL, VLLM_ADAPTER) and `quiver serve` for `vllm serve`, nothing else
VLLM_MODEL = "meta-llama/Llama-2-7b-hf"
VLLM_ADAPTER = ("$HOME/.cache/huggingface/hub/models--yard1--llama-2-7b-sql-lora-test/snapshots/"
                "0dfa347e8877a4d4ed19ee56c140fa518470028c/")
VLLM_LORA_SERVE = """vllm serve meta-llama/Llama-2-7b-hf \\
    --enable-lora \\
    --lora-modules sql-lora=$HOME/.cache/huggingface/hub/models--yard1--llama-2-7b-sql-lora-test/snapshots/0dfa347e8877a4d4ed19ee56c140fa518470028c/
"""
VLLM_LORA_MODULES_JSON = """--lora-modules '{"name": "sql-lora", "path": "/path/to/lora", "base_model_name": "meta-llama/Llama-2-7b"}'"""


def as_quiver(command: str, model: str, adapter: str) -> list[str]:
    """`quiver`'s argv for a `vllm serve` command line: the model and the adapter paths replaced, nothing else."""
    command = command.replace("\\\n", " ").replace(VLLM_MODEL, model).replace(VLLM_ADAPTER, adapter + "/")
    argv = shlex.split(command.replace("/path/to/lora", adapter))
    assert argv[:2] == ["vllm", "serve"], argv
    return argv[1:]


@pytest.mark.parametrize("extra, limits", [
    ("", {}),
    # "the server entrypoint accepts all other LoRA configuration parameters (max_loras, max_lora_rank, max_cpu_loras)"
    (" --max-loras 4 --max-lora-rank 64 --max-cpu-loras 8", {"max_loras": 4, "max_lora_rank": 64, "max_cpu_loras": 8}),
])
def test_vllm_lora_docs_serve_command_as_it_is(extra, limits, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    args = parsed_serve(as_quiver(VLLM_LORA_SERVE.rstrip() + extra, "/m/base", "/a/sql"), monkeypatch)
    assert args.model == "/m/base"
    assert startup_adapters(args) == [("sql-lora", "/a/sql/")]
    cfg = engine_config(args)
    assert {key: getattr(cfg, key) for key in limits} == limits
    assert "--enable-lora: vLLM's flag, accepted; it changes nothing here: adapters are always on" in caplog.messages


def test_vllm_lora_docs_json_lora_modules(monkeypatch):
    """The page's "new format": a JSON item with base_model_name (accepted, unused), after the serve line."""
    command = VLLM_LORA_SERVE.split("--lora-modules")[0] + VLLM_LORA_MODULES_JSON
    args = parsed_serve(as_quiver(command, "/m/base", "/a/sql"), monkeypatch)
    assert args.model == "/m/base" and startup_adapters(args) == [("sql-lora", "/a/sql")]


def test_a_typical_vllm_lora_deployment_line(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    argv = shlex.split("serve /m/base --tensor-parallel-size 1 --pipeline-parallel-size 1 --trust-remote-code "
                       "--dtype half --gpu-memory-utilization 0.85 --max-model-len 4096 --max-num-seqs 32 "
                       "--enable-prefix-caching --seed 7 --enforce-eager --swap-space 4 --disable-log-requests "
                       "--disable-log-stats --uvicorn-log-level warning --download-dir /tmp/hf --enable-lora "
                       "--max-loras 4 --max-lora-rank 32 --lora-dtype auto --enable-auto-tool-choice "
                       "--tool-call-parser hermes --lora-modules sql=/a/sql chat=/a/chat")
    args = parsed_serve(argv, monkeypatch)
    cfg = engine_config(args)
    assert (cfg.model, cfg.dtype, cfg.gpu_memory_utilization, cfg.max_model_len, cfg.max_num_seqs, cfg.seed,
            cfg.max_loras, cfg.max_lora_rank, cfg.enable_prefix_caching) == \
        ("/m/base", "float16", 0.85, 4096, 32, 7, 4, 32, True)
    assert startup_adapters(args) == [("sql", "/a/sql"), ("chat", "/a/chat")]
    assert args.uvicorn_log_level == "warning" and args.tool_call_parser == "hermes"
    accepted = [m.split(":")[0] for m in caplog.messages if "vLLM's flag, accepted" in m]
    assert accepted == ["--tensor-parallel-size 1", "--pipeline-parallel-size 1", "--trust-remote-code",
                        "--download-dir /tmp/hf", "--enforce-eager", "--swap-space 4.0", "--enable-lora",
                        "--enable-auto-tool-choice", "--lora-dtype auto", "--disable-log-requests",
                        "--disable-log-stats"]


@pytest.mark.parametrize("flags", [flags for flags, *_ in VLLM_FLAGS])
def test_every_accepted_vllm_flag_logs_one_line_with_its_reason(flags, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    _, options, _, why, _ = next(entry for entry in VLLM_FLAGS if entry[0] == flags)
    switch = options.get("action") == "store_true"
    value = [] if switch else [options.get("metavar") or (options.get("choices") or ["2"])[0]]
    for flag in flags:  # -tp as --tensor-parallel-size
        caplog.clear()
        args = parsed_serve(["serve", flag, *value, "/m/base"], monkeypatch)
        assert args.model == "/m/base"
        given = flags[0] if switch else f"{flags[0]} {getattr(args, flags[0][2:].replace('-', '_'))}"
        assert [m for m in caplog.messages if "vLLM's flag" in m] == \
            [f"{given}: vLLM's flag, accepted; it changes nothing here: {why}"]


@pytest.mark.parametrize("argv, needle", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2: not supported: tensor parallelism is not "
                                      "implemented: Quiver runs the whole model on one device"),
    (["-tp", "4"], "--tensor-parallel-size 4: not supported: tensor parallelism"),
    (["-pp", "2"], "--pipeline-parallel-size 2: not supported: pipeline parallelism is not implemented"),
    (["--data-parallel-size", "2"], "--data-parallel-size 2: not supported: data-parallel copies are Ray Serve "
                                    "replicas here: quiver ray serve --replicas N"),
    (["--quantization", "awq"], "--quantization awq: not supported: Quiver's 4-bit base is bitsandbytes' nf4 or fp4"),
    (["--quantization", "bitsandbytes"], "--quantization bitsandbytes: not supported"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: not supported: the KV cache is held in the serving dtype"),
    (["--dtype", "float32", "--lora-dtype", "bfloat16"], "--lora-dtype bfloat16: not supported: adapters are "
                                                         "applied in the serving dtype"),
])
def test_vllm_values_quiver_lacks_are_refused_by_name_with_the_reason(argv, needle, capsys):
    err = one_line_error(["serve", "/m/base", *argv], capsys)
    assert err.startswith("quiver serve: error: " + needle), err


def test_vllm_bitsandbytes_on_a_checkpoint_saved_4bit_is_read_as_it_is(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    assert parsed_serve(["serve", str(tmp_path), "--quantization", "bitsandbytes"], monkeypatch).quantization is None
    assert "--quantization bitsandbytes: vLLM's flag, accepted; it changes nothing here: the checkpoint is saved " \
           "4-bit by bitsandbytes, and read as it is" in caplog.messages
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # vLLM would quantize it in flight
    err = one_line_error(["serve", str(tmp_path), "--quantization", "bitsandbytes"], capsys)
    assert err.startswith("quiver serve: error: --quantization bitsandbytes: not supported: ") and "nf4" in err


def test_same_lora_dtype_as_dtype_and_vllm_dtype_spellings(monkeypatch):
    args = parsed_serve(["serve", "--dtype", "float", "--lora-dtype", "float32"], monkeypatch)
    assert args.dtype == args.lora_dtype == "float32"
    assert parsed_serve(["serve", "--dtype", "half"], monkeypatch).dtype == "float16"


@pytest.mark.parametrize("argv, shown", [
    (["--max-logprobs", "5"], "--max-logprobs 5"),  # not a quiver flag: its value is not served as MODEL "5"
    (["--max-logprobs", "5", "/m/base"], "--max-logprobs 5 /m/base"),
    (["/m/base", "--max-logprobs", "5"], "--max-logprobs 5"),
    (["--max-logprobs=5", "/m/base"], "--max-logprobs=5"),
])
def test_an_unknown_flags_value_is_never_taken_as_model(argv, shown, capsys):
    err = one_line_error(["serve", *argv], capsys)
    assert err == f"quiver serve: error: unrecognized arguments: {shown}"


@pytest.mark.parametrize("argv, model", [
    (["-tp", "1", "/m/base"], "/m/base"), (["/m/base", "-tp", "1"], "/m/base"),
    (["--tensor-parallel-size=1", "/m/base"], "/m/base"), (["--tensor-parallel-size", "1"], None),
])
def test_a_known_vllm_flags_value_is_never_taken_as_model(argv, model, monkeypatch):
    assert parsed_serve(["serve", *argv], monkeypatch).model == model


def test_threads_is_num_threads(monkeypatch):
    assert engine_config(parsed_serve(["serve", "--threads", "1"], monkeypatch)).num_threads == 1


def test_quiver_ray_serve_and_serve_run_refuse_what_quiver_lacks(capsys):
    from quiver.server.rayserve.__main__ import main as ray_main
    from quiver.server.rayserve.app import app_builder

    with pytest.raises(SystemExit) as e:
        ray_main(["serve", "-tp", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("quiver ray serve: error: --tensor-parallel-size 2: not "
                                                      "supported: tensor parallelism is not implemented")
    with pytest.raises(ValueError, match="--pipeline-parallel-size 2: not supported"):
        app_builder({"pipeline_parallel_size": "2"})


QUIVER = str(Path(sys.executable).parent / "quiver")


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_quiver_bench_lists_every_benchmark_with_its_run_time(args):
    """`quiver bench`, `--help` and `-h` list what there is to run (rc 0), each with its run time; the list
    is every module of the bench folder that is a `quiver bench NAME` program."""
    import subprocess

    bench_dir = Path(__file__).parents[1] / "bench"
    programs = {p.stem for p in bench_dir.glob("*.py") if f'prog="quiver bench {p.stem}"' in p.read_text()}
    done = subprocess.run([QUIVER, "bench", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: quiver bench NAME") and "quiver-bench-results" in done.stdout
    listed = {}
    for line in done.stdout.splitlines():
        if line.startswith("  ") and line.split()[0] in programs | {"gpu_check"}:
            listed[line.split()[0]] = line
    assert set(listed) == programs | {"gpu_check"}
    for name, line in listed.items():
        assert re.search(r"about [\d.]+ (s|min) on 2 cores|needs a CUDA GPU", line), line


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_quiver_bench_name_help(flag, capsys):
    """`quiver bench NAME --help` says what NAME measures, how long it takes, and its options with --out's
    default (in process: `quiver bench` hands every argument to python -m quiver.bench as it is)."""
    from quiver.bench.__main__ import BENCHMARKS
    from quiver.bench.__main__ import main as bench_main

    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as e:
            bench_main([name, flag])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"quiver bench {name}: {BENCHMARKS[name][0]} ("), out[:200]
        assert "--out" in out and (name == "gpu_check" or "quiver-bench-results" in out), name
    with pytest.raises(SystemExit) as e:
        bench_main(["no_such_bench"])
    assert e.value.code == 2 and "no benchmark named 'no_such_bench'" in capsys.readouterr().err


def test_base_path_prints_the_folder_quiver_serve_reads(tiny_models, smollm2_dir, monkeypatch, capsys):
    """`quiver base-path` is what to train adapters on: the embedded GGUF's converted HF folder (under the
    cache), or MODEL's folder, absolute, alone on stdout."""
    from quiver.server.model.checkpoint import cache_root

    main(["base-path"])
    out = capsys.readouterr().out
    assert out == f"{smollm2_dir.resolve()}\n" and (smollm2_dir / "config.json").is_file()
    assert smollm2_dir.resolve().parent == (cache_root() / "gguf").resolve()
    model_dir = tiny_models["llama_gqa"][0]
    monkeypatch.chdir(model_dir.parent)
    for argv in (["base-path", model_dir.name], ["base-path", "--model", model_dir.name]):
        main(argv)
        assert capsys.readouterr().out == f"{model_dir.resolve()}\n"
    err = one_line_error(["base-path", "no-such-model"], capsys)
    assert err.startswith("quiver base-path: error: ") and "no-such-model" in err, err


@pytest.mark.parametrize("flags,warned", [
    (["--host", "0.0.0.0"], True), (["--host", "::"], True), (["--host", "10.1.2.3"], True),
    ([], False), (["--host", "localhost"], False), (["--host", "::1"], False),
    (["--host", "0.0.0.0", "--api-key", "k"], False)])
def test_listening_beyond_loopback_without_a_key_warns_once(flags, warned, tiny_models, monkeypatch, caplog):
    """Served to the network with no key, anyone who reaches the port can generate and manage adapters:
    start-up says so in one WARNING line (and still starts: the image and the tests rely on it)."""
    monkeypatch.delenv("QUIVER_API_KEY", raising=False)
    serve = cli.serve
    args = parsed_serve(["serve", str(tiny_models["llama_gqa"][0]), *flags], monkeypatch)

    class Started(Exception):
        pass

    monkeypatch.setattr(cli, "listen_socket", lambda host, port: None)
    monkeypatch.setattr(cli, "build_server", lambda args: (_ for _ in ()).throw(Started()))
    with caplog.at_level(logging.INFO), pytest.raises(Started):
        serve(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warned and all("anyone who can reach" in w and "--api-key" in w for w in warnings)


@pytest.mark.parametrize("config, says", [
    ({"model_type": "qwen3_moe", "num_experts": 8}, "model_type 'qwen3_moe' (a mixture-of-experts base) is not "
                                                    "supported (supported: llama, mistral, qwen2, qwen3, gemma2"),
    ({"model_type": "gemma3"}, "model_type 'gemma3' (a vision-language model (serve its text model"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (supported: llama"),
])
def test_an_unsupported_architecture_is_one_line_before_any_weight_is_read(config, says, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights at all: refused before looking
    err = one_line_error(["serve", str(tmp_path), "--dtype", "float32", "--port", "0"], capsys)
    assert err.startswith("quiver serve: error: " + says), err
