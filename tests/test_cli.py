"""The command line: flags reach the engine config, vLLM's spellings work, bad values are one-line errors."""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import pytest

from quiver.server import cli
from quiver.server.assemble import add_engine_args, engine_config, parse_adapters, startup_adapters
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
