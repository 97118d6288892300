"""Device decisions made without a GPU: the KV cache sized from a stubbed free-memory figure, dtype
`auto`, and a clear refusal of a CUDA device torch cannot use."""
from __future__ import annotations

import json

import pytest
import torch

from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.scheduler import Scheduler
from quiver.server.engine.sequence import Sequence
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
    blocks = kv_cache_blocks(cfg, LLAMA_8B, torch.bfloat16, torch.device("cuda"), weights,
                             lambda: (total - weights, total))
    budget = (0.9 * total - weights - lora_slot_bytes(LLAMA_8B, 8, 16, torch.bfloat16)
              - working_reserve(LLAMA_8B, 8192, 256, torch.bfloat16))
    assert blocks == int(budget // kv_block_bytes(LLAMA_8B, 16, torch.bfloat16))
    assert blocks * 16 > 700_000  # ~100 GiB of KV: far past one 8192-token sequence (the old 512 MiB held 4,096)
    assert 0.8 * 0.9 * total < weights + blocks * kv_block_bytes(LLAMA_8B, 16, torch.bfloat16) < 0.9 * total


def test_fraction_and_overrides():
    total, free = 24 * GiB, 8 * GiB  # a 24 GB card with 16 GB held by another process
    capped = kv_cache_blocks(EngineConfig(device="cuda", gpu_memory_utilization=0.9), LLAMA_8B, torch.bfloat16,
                             torch.device("cuda"), 0, lambda: (free, total))
    cfg = EngineConfig(device="cuda")
    held = lora_slot_bytes(LLAMA_8B, cfg.max_loras, cfg.max_lora_rank, torch.bfloat16) + working_reserve(
        LLAMA_8B, cfg.max_num_batched_tokens, cfg.max_num_seqs, torch.bfloat16)
    assert capped == int((free - held) // kv_block_bytes(LLAMA_8B, 16, torch.bfloat16))  # what is free, no more
    given = EngineConfig(device="cuda", kv_cache_memory_mb=1024)
    assert kv_cache_blocks(given, LLAMA_8B, torch.bfloat16, torch.device("cuda"), 0, lambda: (free, total)) == \
        1024 * MiB // kv_block_bytes(LLAMA_8B, 16, torch.bfloat16)
    assert kv_cache_blocks(EngineConfig(device="cuda", num_kv_blocks=77), LLAMA_8B, torch.bfloat16,
                           torch.device("cuda"), 0, lambda: (free, total)) == 77
    cpu = kv_cache_blocks(EngineConfig(), LLAMA_8B, torch.float32, torch.device("cpu"))
    assert cpu == 512 * MiB // kv_block_bytes(LLAMA_8B, 16, torch.float32)  # the CPU's default


class StubGpu:
    """One GPU's memory as engines sized on it see it: each engine's weights and KV cache are held."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    def info(self) -> tuple[int, int]:
        return self.total - self.used, self.total

    def start_engine(self, cfg: EngineConfig, weights: int) -> int:
        self.used += weights
        blocks = kv_cache_blocks(cfg, LLAMA_8B, torch.bfloat16, torch.device("cuda"), weights, self.info)
        self.used += blocks * kv_block_bytes(LLAMA_8B, cfg.block_size, torch.bfloat16)
        return blocks


def test_two_engines_on_one_gpu_each_get_their_share():
    """K0: the second engine (a second bench engine, or a Ray replica of half a GPU) counts only its own
    weights against its fraction, not the first engine's memory; both get the same cache and fit together."""
    gpu, weights = StubGpu(80 * GiB), 16 * GiB
    cfg = EngineConfig(device="cuda", gpu_memory_utilization=0.45)
    first, second = gpu.start_engine(cfg, weights), gpu.start_engine(cfg, weights)
    assert first == second > 8192 // 16  # each holds far more than one 8k sequence
    assert gpu.used <= 0.9 * gpu.total
    # the old sizing, used = total - free, counted the first engine's 36 GB as the second's and gave it 0 blocks
    greedy = StubGpu(80 * GiB)
    assert greedy.start_engine(EngineConfig(device="cuda"), weights) > 0
    assert 0 <= greedy.start_engine(EngineConfig(device="cuda"), weights) < first  # only what is left


def test_the_reserve_holds_a_prompt_logprob_chunk():
    """K5: a row owing prompt logprobs computes float32 logits and their log-softmax for its chunk; the
    scheduler caps that chunk, and the reserve holds it."""
    from quiver.server.engine.scheduler import PROMPT_LOGPROB_CHUNK

    base = working_reserve(LLAMA_8B, 8192, 256, torch.bfloat16)
    logits = PROMPT_LOGPROB_CHUNK * LLAMA_8B.vocab_size * 4
    assert base >= 3 * logits
    blocks = BlockManager(num_blocks=256, block_size=16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=2048)
    prompt = list(range(3, 3 + 3 * PROMPT_LOGPROB_CHUNK))
    for rid, params in (("scored", SamplingParams(max_tokens=1, prompt_logprobs=0)), ("plain", SamplingParams())):
        scheduler.add(Sequence(rid, prompt, params, seed=0))
    rows = {seq.request_id: n for seq, n in scheduler.schedule().rows}
    assert rows == {"scored": PROMPT_LOGPROB_CHUNK, "plain": len(prompt)}


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
