"""Start-up warm-up of the Triton kernels (run here through the interpreter): attention on prefill and
decode rows and both LoRA forms run before the first request, and the engine is left free for it."""
from __future__ import annotations

import torch
from helpers import all_blocks_free, make_tiny_model

from quiver.kernels import lora_triton
from quiver.kernels.ops import TritonOps
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from quiver.server.engine.warmup import warm_up


def test_warm_up_runs_every_kernel_form_and_leaves_the_engine_free(tmp_path, plain_tokenizer, monkeypatch):
    make_tiny_model(tmp_path / "m", "llama_gqa")
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "m"), kernels="triton", dtype="float32", num_kv_blocks=64,
                                    block_size=4, max_loras=2, max_lora_rank=8), tokenizer=plain_tokenizer)
    seen = {"query_lengths": set(), "lora_tokens": set()}
    attention, apply = TritonOps.attention, lora_triton.lora_apply

    def spy_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
        for group in meta:
            seen["query_lengths"].update(group.q_lens.tolist())
        return attention(q, k_cache, v_cache, meta, scale, window, softcap)

    def spy_apply(x, y, a, b, offsets, meta):
        seen["lora_tokens"].add(x.shape[0])
        return apply(x, y, a, b, offsets, meta)

    monkeypatch.setattr(TritonOps, "attention", staticmethod(spy_attention))
    monkeypatch.setattr(lora_triton, "lora_apply", spy_apply)
    assert warm_up(engine) > 0
    assert 1 in seen["query_lengths"] and max(seen["query_lengths"]) > engine.blocks.block_size  # decode, prefill
    assert {1, 64} <= seen["lora_tokens"]  # BGMV and SGMV (64 tokens of one adapter: full row tiles)
    assert not engine.has_work() and all_blocks_free(engine)
    out = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert len(out.output_ids) == 2


def test_warm_up_is_a_no_op_on_the_torch_ops(tmp_path, plain_tokenizer):
    make_tiny_model(tmp_path / "m", "llama_gqa")
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "m"), dtype="float32", num_kv_blocks=64, block_size=4),
                       tokenizer=plain_tokenizer)
    assert engine.kernels == "torch" and warm_up(engine) == 0.0 and engine.stats().kv_blocks_cached == 0
