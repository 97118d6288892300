"""The new architectures quantized and merged: QLoRA NF4 on Qwen3 and Gemma 3 against PEFT over the
bitsandbytes model (as tests/test_qlora.py does for Llama), and `quiver merge` on each architecture against
transformers' load of the merged model. Phi-3 merges wait for LoRA on its fused modules."""
from __future__ import annotations

import pytest
import torch
from helpers import NEW_ARCHS, check_mixed_batch, make_tiny_model
from test_qlora import assert_fp32_path, bnb_4bit, engine_on

from quiver.server.merge import merge_adapters
from quiver.server.model.fourbit import Weight4bit

# bitsandbytes' CPU dequantize wants every in_features a multiple of 64 (see tests/test_qlora.py)
QLORA_SHAPES = {"qwen3": dict(intermediate_size=128, head_dim=32), "gemma3_text": dict(intermediate_size=128)}


@pytest.mark.parametrize("arch", sorted(QLORA_SHAPES))
def test_qlora_nf4_mixed_batch_equals_peft_on_bitsandbytes(arch, plain_tokenizer, tmp_path):
    from peft import LoraConfig
    from peft_fixtures import ALL7, make_adapter

    make_tiny_model(tmp_path / "src", arch, **QLORA_SHAPES[arch])
    hf = bnb_4bit(tmp_path / "src", tmp_path / "q", "nf4", True)
    adapters = {"lora_all7": LoraConfig(r=8, lora_alpha=16, target_modules=ALL7),
                "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL7)}
    for i, (name, config) in enumerate(adapters.items()):
        make_adapter(hf, tmp_path / name, config, seed=500 + i)
    engine = engine_on(tmp_path / "q", plain_tokenizer)
    assert engine.quantization == "nf4"
    assert engine.runner.model.layers[0].qkv.__class__ is Weight4bit
    check_mixed_batch(engine, hf, {name: tmp_path / name for name in adapters}, vocab=512, atol=1e-4)
    assert_fp32_path(hf)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_merged_model_loaded_by_transformers_equals_peft(arch, tmp_path):
    from peft import LoraConfig, PeftModel
    from peft_fixtures import make_adapter
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = make_tiny_model(tmp_path / "base", arch)
    make_adapter(hf, tmp_path / "lora", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), seed=600)
    out = merge_adapters(tmp_path / "base", [(tmp_path / "lora", 1.0)], tmp_path / "merged")
    base, merged = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert merged.keys() == base.keys()
    for key, tensor in base.items():  # norms (q/k norms included), embeddings: through unchanged
        if not key.endswith("proj.weight"):
            assert torch.equal(merged[key], tensor), key
    ids = torch.tensor([[17, 200, 33, 4, 99, 123, 7, 8, 300, 41]])  # past gemma's windows
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits[0]
        peft = PeftModel.from_pretrained(hf, tmp_path / "lora").eval()
        want = peft(ids).logits[0]
        before = peft.get_base_model()
        with peft.disable_adapter():
            plain = before(ids).logits[0]
    assert (theirs - want).abs().max().item() <= 1e-4
    assert (plain - want).abs().max().item() > 1e-3  # the LoRA moved the logits
