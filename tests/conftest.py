"""Shared fixtures: tiny random Llama-family models on disk, the embedded SmolLM2, engines."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_CONFIGS = {
    # GQA, tied embeddings
    "llama_gqa": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # MHA, odd sizes, untied
    "llama_mha_odd": dict(model_type="llama", hidden_size=60, intermediate_size=77, num_hidden_layers=3,
                          num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=False),
    # MQA with llama3 rope scaling and a large theta
    "llama_mqa_rope3": dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=3, num_key_value_heads=1, rope_theta=500000.0,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=4096),
}


def make_tiny_model(path, name: str, vocab_size: int = 512, seed: int = 0):
    """Save a random model of the named tiny config under `path`; return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=256,
                               initializer_range=0.2, bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so loading them is tested
        for name_, p in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def smollm2_dir():
    from server.model_source import resolve_model
    return resolve_model(None)[0]


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (dir, HF model), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: (root / name, make_tiny_model(root / name, name)) for name in TINY_CONFIGS}
