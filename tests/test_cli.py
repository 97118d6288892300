"""The command line: flags reach the engine config, bad --adapter values are clear errors."""
from __future__ import annotations

import argparse

import pytest

from quiver.server.cli import add_engine_args, engine_config, main, parse_adapters


def test_flags_reach_engine_config():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = engine_config(p.parse_args(["--max-loras", "3", "--max-lora-rank", "32", "--dtype", "bfloat16",
                                      "--lora-starvation-steps", "5", "--num-kv-blocks", "10"]))
    assert (cfg.max_loras, cfg.max_lora_rank, cfg.dtype, cfg.lora_starvation_steps, cfg.num_kv_blocks) == \
        (3, 32, "bfloat16", 5, 10)


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
        main(["serve", "--model", str(model_dir), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no CUDA device" in err and len(err.splitlines()) == 1, err
