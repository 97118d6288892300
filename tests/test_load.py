"""The load test (bench/load.py) on the tiny model: a short smoke run, and the bounded soak
(64 streaming clients for 4 minutes over 8 adapters of five families), marked slow."""
from __future__ import annotations

import json

import pytest
from test_bench_smoke import _model_with_tokenizer


def run_load(api_model, tokenizer, tmp_path, clients: int, duration: float, sample: int) -> dict:
    from quiver.bench import load

    model_dir = _model_with_tokenizer(api_model, tokenizer, tmp_path)
    out = tmp_path / "results"
    result = load.main(["--model", str(model_dir), "--clients", str(clients), "--duration", str(duration),
                        "--max-tokens", "32", "--reference-sample", str(sample), "--kv-cache-mb", "64",
                        "--threads", "2", "--dtype", "float32", "--out", str(out)])
    data = json.loads((out / "load.json").read_text())
    assert data["requests"] == result["requests"] and data["passed"] is True and data["failures"] == []
    return data


def check(data: dict, clients: int, sample: int) -> None:
    assert data["clients"] == clients
    assert data["requests"] > 0 and data["completed"] == data["requests"]
    assert data["errors"] == 0
    assert data["requests_per_s"] > 0 and data["output_tokens_per_s"] > 0
    ttft = data["ttft_ms"]
    assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    # every family carried traffic
    assert set(data["per_family"]) == {"base", "lora", "prompt_tuning", "p_tuning", "prefix_tuning", "bottleneck"}
    assert sum(data["per_family"].values()) == data["requests"]
    # no leaks: nothing left running, only the prefix adapters' blocks held, then everything free
    kv = data["kv_after_load"]
    assert kv["seqs"] == kv["running"] == kv["waiting"] == 0 and kv["adapter_users"] == {}
    assert kv["prefix_blocks"] > 0
    assert kv["blocks_free"] == kv["blocks_total"] - kv["prefix_blocks"]
    assert data["unload_errors"] == {}
    assert data["blocks_free_after"] == data["blocks_total"]
    assert data["kv_after_unload"]["adapters"] == [] and data["kv_after_unload"]["lora_slots_used"] == 0
    # greedy outputs under load equal the same requests run alone
    assert data["reference_checked"] == sample and data["reference_mismatches"] == 0
    assert len(data["reference_models"]) >= min(sample, 9)
    assert data["rss_flat"] is True
    assert data["rss_mib"]["end"] <= data["rss"]["limit_mib"]
    assert data["machine"]["cores"] >= 1
    assert (data["device"], data["dtype"]) == ("cpu", "float32")


def test_load_smoke(api_model, tokenizer, tmp_path):
    data = run_load(api_model, tokenizer, tmp_path, clients=8, duration=10, sample=9)
    check(data, clients=8, sample=9)


@pytest.mark.slow
def test_load_soak_64_clients_4_minutes(api_model, tokenizer, tmp_path):
    data = run_load(api_model, tokenizer, tmp_path, clients=64, duration=240, sample=16)
    check(data, clients=64, sample=16)
    assert data["duration"] == 240 and data["wall_s"] >= 240
