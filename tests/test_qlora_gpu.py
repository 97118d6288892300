"""A 4-bit base on a CUDA GPU: the same bitsandbytes checkpoint and QLoRA adapters served on the GPU
(dequantized tile by tile into a device scratch, then cuBLAS) against the CPU engine, whose equality
with transformers + PEFT on bitsandbytes test_qlora.py shows. Runs where torch sees a GPU (make gpu-check)."""
from __future__ import annotations

import pytest
import torch
from helpers import capture_logits, make_tiny_model
from peft import LoraConfig
from peft_fixtures import ALL7, make_adapter

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (make gpu-wheels carries it to a GPU machine)")
from test_qlora import bnb_4bit  # noqa: E402 (imports bitsandbytes)

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run by make gpu-check")

TOLERANCE = {"float32": 1e-3, "bfloat16": 8e-2}  # relative to the largest logit, as tests/test_gpu.py


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_4bit_base_on_the_gpu_matches_the_cpu(tmp_path, plain_tokenizer, dtype):
    make_tiny_model(tmp_path / "src", "llama_gqa", intermediate_size=128)
    hf = bnb_4bit(tmp_path / "src", tmp_path / "q", "nf4", True)
    make_adapter(hf, tmp_path / "qlora", LoraConfig(r=8, lora_alpha=16, target_modules=ALL7), seed=1)
    make_adapter(hf, tmp_path / "qdora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL7), seed=2)
    logits = []
    for device, kind in (("cpu", "float32"), ("cuda", dtype)):
        engine = LLMEngine(EngineConfig(model=str(tmp_path / "q"), device=device, dtype=kind, num_kv_blocks=64,
                                        block_size=16, max_model_len=128), tokenizer=plain_tokenizer)
        for name in ("qlora", "qdora"):
            engine.load_adapter(name, str(tmp_path / name))
        seen = capture_logits(engine)
        for i, adapter in enumerate([None, "qlora", "qdora"]):
            engine.add_request([5 + i, 17, 200, 33, 4, 99][:4 + i], SamplingParams(max_tokens=1, temperature=0),
                               adapter=adapter, request_id=f"r{i}")
        while engine.has_work():
            engine.step()
        logits.append(torch.stack([seen[0][f"r{i}"].float().cpu() for i in range(3)]))
    cpu, gpu = logits
    assert (gpu - cpu).abs().max().item() <= TOLERANCE[dtype] * cpu.abs().max().item()
