"""Every architecture beyond Llama's (server.model.archs) against transformers and PEFT: base rows and every
adapter family in one mixed batch, built from tiny random configs of each model type."""
from __future__ import annotations

import json

import pytest
from helpers import NEW_ARCHS, check_mixed_batch, make_tiny_model
from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
from peft_fixtures import make_adapter, make_prompt_adapter

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.model.config import ModelConfig

FUSED = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
UNFUSED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def family_configs(model_type: str) -> dict[str, object]:
    """Each family once: LoRA on every linear module, DoRA, AdaLoRA, prompt tuning and prefix tuning."""
    every = FUSED.get(model_type, UNFUSED)
    lm = TaskType.CAUSAL_LM
    prompts = {"prompt_tuning": PromptTuningConfig(task_type=lm, num_virtual_tokens=5),
               "prefix": PrefixTuningConfig(task_type=lm, num_virtual_tokens=7)}
    if model_type in FUSED:
        return prompts
    return {**prompts,
        "lora_all": LoraConfig(r=4, lora_alpha=8, target_modules=every),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=every[:2]),
        "adalora": AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=10, tinit=1, tfinal=2,
                                 target_modules=[every[0], every[-1]]),
    }


@pytest.fixture(scope="module", params=NEW_ARCHS)
def arch_set(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(root / "model", request.param)
    paths = {}
    for i, (name, cfg) in enumerate(family_configs(request.param).items()):
        if name in ("prompt_tuning", "prefix"):
            make_prompt_adapter(hf, root / name, cfg, seed=500 + i)
        else:
            make_adapter(hf, root / name, cfg, seed=500 + i)
        paths[name] = root / name
    return request.param, root / "model", hf, paths


def engine_on(model_dir, tokenizer) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), num_kv_blocks=128, block_size=4,
                                  max_model_len=128, max_loras=4, max_lora_rank=8), tokenizer=tokenizer)


def test_base_rows_equal_transformers(arch_set, plain_tokenizer):
    _, model_dir, hf, _ = arch_set
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, {}, hf.config.vocab_size)


@pytest.mark.parametrize("family", ["prompt_tuning", "prefix", "lora_all", "dora", "adalora"])
def test_each_family_in_a_mixed_batch_equals_peft(arch_set, plain_tokenizer, family):
    _, model_dir, hf, paths = arch_set
    if family not in paths:
        pytest.skip("LoRA on fused checkpoint modules is not served yet")
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, {family: paths[family]}, hf.config.vocab_size)


def test_every_family_in_one_batch_equals_peft(arch_set, plain_tokenizer):
    _, model_dir, hf, paths = arch_set
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, paths, hf.config.vocab_size)


@pytest.mark.parametrize("model_type,says", [
    ("qwen3_moe", "a mixture-of-experts base"), ("gemma3", "a vision-language model"), ("gpt2", "not supported")])
def test_an_unsupported_model_type_is_one_line_naming_it(model_type, says, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*{says}.*supported: llama, mistral, qwen2, qwen3"):
        ModelConfig.from_dir(tmp_path)
