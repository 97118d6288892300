"""Device decisions made without a GPU: the KV cache sized from a stubbed free-memory figure, dtype
`auto`, and a clear refusal of a CUDA device torch cannot use."""
from __future__ import annotations

import json

import pytest
import torch

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.device import (MiB, cpu_bf16_flag, kv_block_bytes, kv_cache_blocks, lora_slot_bytes,
                                         resolve_device, resolve_dtype, working_reserve)
from quiver.server.model.config import ModelConfig

LLAMA_8B = ModelConfig.from_dict({
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False})
GiB = 2**30


def test_gpu_kv_cache_takes_what_the_memory_fraction_leaves():
    cfg = EngineConfig(device="cuda", max_loras=8, max_lora_rank=16)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (256, 8192)  # GPU defaults
    total, weights = 139 * GiB, 16 * GiB  # an H200 holding Llama-8B in bf16
    blocks = kv_cache_blocks(cfg, LLAMA_8B, torch.bfloat16, torch.device("cuda"), lambda: (total - weights, total))
    budget = (0.9 * total - weights - lora_slot_bytes(LLAMA_8B, 8, 16, torch.bfloat16)
              - working_reserve(LLAMA_8B, 8192, 256, torch.bfloat16))
    assert blocks == int(budget // kv_block_bytes(LLAMA_8B, 16, torch.bfloat16))
    assert blocks * 16 > 700_000  # ~100 GiB of KV: far past one 8192-token sequence (the old 512 MiB held 4,096)
    assert 0.8 * 0.9 * total < weights + blocks * kv_block_bytes(LLAMA_8B, 16, torch.bfloat16) < 0.9 * total


def test_fraction_and_overrides():
    total, free = 24 * GiB, 8 * GiB  # a 24 GB card with 16 GB already in use
    half = kv_cache_blocks(EngineConfig(device="cuda", gpu_memory_utilization=0.7), LLAMA_8B, torch.bfloat16,
                           torch.device("cuda"), lambda: (free, total))
    assert half == 0  # 0.7 x 24 GB is less than what is already in use: the runner then refuses to start
    given = EngineConfig(device="cuda", kv_cache_memory_mb=1024)
    assert kv_cache_blocks(given, LLAMA_8B, torch.bfloat16, torch.device("cuda"), lambda: (free, total)) == \
        1024 * MiB // kv_block_bytes(LLAMA_8B, 16, torch.bfloat16)
    assert kv_cache_blocks(EngineConfig(device="cuda", num_kv_blocks=77), LLAMA_8B, torch.bfloat16,
                           torch.device("cuda"), lambda: (free, total)) == 77
    cpu = kv_cache_blocks(EngineConfig(), LLAMA_8B, torch.float32, torch.device("cpu"))
    assert cpu == 512 * MiB // kv_block_bytes(LLAMA_8B, 16, torch.float32)  # the CPU's default


def test_dtype_auto(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_dtype("auto", torch.device("cuda"), tmp_path) == torch.bfloat16
    on_this_cpu = torch.bfloat16 if cpu_bf16_flag() else torch.float32  # tests/test_bf16.py covers both cases
    assert resolve_dtype("auto", torch.device("cpu"), tmp_path) == on_this_cpu
    assert resolve_dtype("float16", torch.device("cpu"), tmp_path) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert resolve_dtype("auto", torch.device("cuda"), tmp_path) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a machine without CUDA gives")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:1")
