"""The server's log tells adapter loads, tier moves (evictions) and failed loads, with name, family and tier."""
from __future__ import annotations

import logging

import pytest
from helpers import run_one

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine


@pytest.fixture
def registry_log(caplog):
    caplog.set_level(logging.INFO, logger="quiver.server.families")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "quiver.server.families"]


def test_loads_and_evictions_are_logged_with_family_and_tier(tiny_lora_set, plain_tokenizer, registry_log):
    base_dir, _, paths = tiny_lora_set
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=32, max_model_len=64,
                                    max_loras=1,
                                    max_cpu_loras=2), tokenizer=plain_tokenizer)
    for name in ("a", "b", "c"):
        engine.load_adapter(name, str(paths["lora_qv"]))
    run_one(engine, "b")
    run_one(engine, "c")  # b leaves the one device slot
    engine.unload_adapter("c")
    assert registry_log() == [
        f"adapter a (lora) loaded from {paths['lora_qv']}: tier cpu",
        f"adapter b (lora) loaded from {paths['lora_qv']}: tier cpu",
        f"adapter c (lora) loaded from {paths['lora_qv']}: tier cpu",
        "adapter a (lora) evicted, tier cpu -> disk (--max-cpu-loras 2)",
        "adapter b (lora) evicted, tier device -> cpu (--max-loras 1)",
        "adapter c (lora) unloaded",
    ]


def test_failed_loads_are_logged(tiny_lora_set, plain_tokenizer, registry_log, tmp_path):
    base_dir, _, _ = tiny_lora_set
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=32, max_model_len=64),
                       tokenizer=plain_tokenizer)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "NOPE"}')
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"")  # complete: found by add_adapter_dir
    with pytest.raises(ValueError):
        engine.load_adapter("api", str(tmp_path / "broken"))  # as a load through the API or the command line
    engine.add_adapter_dir(str(tmp_path))
    run_one(engine, "broken")  # read on first use
    logged = registry_log()
    assert len(logged) == 3, logged
    assert logged[0].startswith(f"adapter api (family unknown) failed to load from {tmp_path / 'broken'}: ")
    assert logged[1].startswith("adapter broken (family unknown) failed to load from ")
    assert "peft_type 'NOPE' is not supported" in logged[1]
    assert logged[2] == "adapter broken: tier failed, until it is unloaded"
