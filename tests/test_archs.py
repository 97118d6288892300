"""Every architecture beyond Llama's (server.model.archs) against transformers and PEFT: base rows and every
adapter family in one mixed batch, built from tiny random configs of each model type."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
from helpers import NEW_ARCHS, LiveServer, check_mixed_batch, make_tiny_model
from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
from peft_fixtures import forward_greedy, make_adapter, make_prompt_adapter, peft_greedy
from safetensors.torch import load_file, save_file

from quiver.adapters.errors import AdapterError
from quiver.server.engine.async_engine import AsyncEngine
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.model.config import ModelConfig

FUSED = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
UNFUSED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def family_configs(model_type: str) -> dict[str, object]:
    """Each family once: LoRA on every linear module (Phi-3's fused ones by their checkpoint names), DoRA on an
    attention and an MLP projection, AdaLoRA, prompt tuning and prefix tuning."""
    every = FUSED.get(model_type, UNFUSED)
    lm = TaskType.CAUSAL_LM
    return {
        "prompt_tuning": PromptTuningConfig(task_type=lm, num_virtual_tokens=5),
        "prefix": PrefixTuningConfig(task_type=lm, num_virtual_tokens=7),
        "lora_all": LoraConfig(r=4, lora_alpha=8, target_modules=every),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=[every[0], every[-2]]),
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


def engine_on(model_dir, tokenizer, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), num_kv_blocks=128, block_size=4,
                                  max_model_len=128, max_loras=4, max_lora_rank=8, **config), tokenizer=tokenizer)


def test_base_rows_equal_transformers(arch_set, plain_tokenizer):
    _, model_dir, hf, _ = arch_set
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, {}, hf.config.vocab_size)


@pytest.mark.parametrize("family", ["prompt_tuning", "prefix", "lora_all", "dora", "adalora"])
def test_each_family_in_a_mixed_batch_equals_peft(arch_set, plain_tokenizer, family):
    _, model_dir, hf, paths = arch_set
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, {family: paths[family]}, hf.config.vocab_size)


def test_every_family_in_one_batch_equals_peft(arch_set, plain_tokenizer):
    _, model_dir, hf, paths = arch_set
    check_mixed_batch(engine_on(model_dir, plain_tokenizer), hf, paths, hf.config.vocab_size)


def test_a_lora_on_modules_the_base_does_not_save_is_refused_in_one_line(arch_set, plain_tokenizer, tmp_path):
    """q_proj over Phi-3's fused qkv_proj, and qkv_proj over a base that saves q/k/v apart: PEFT could not
    have trained either there, and no slice of the fused weight is one the adapter names."""
    model_type, model_dir, _, paths = arch_set
    fused = model_type in FUSED
    wrong, right = ("q_proj", "qkv_proj") if fused else ("qkv_proj", "q_proj")
    bad = tmp_path / "bad"
    shutil.copytree(paths["lora_all"], bad)
    weights = bad / "adapter_model.safetensors"
    save_file({k.replace(f".{right}.", f".{wrong}."): v for k, v in load_file(weights).items()}, weights)
    engine = engine_on(model_dir, plain_tokenizer)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("bad", str(bad))
    modules = ", ".join(FUSED[model_type] if fused else UNFUSED)
    assert f"target module {wrong!r} does not exist in this base model (its modules: {modules})" in str(e.value)
    assert "\n" not in str(e.value) and engine.adapter_names() == []


def test_greedy_text_over_http_equals_transformers_and_peft(arch_set, plain_tokenizer):
    """/v1/completions end to end, the base and a LoRA on every projection, against the oracles' greedy tokens.
    (The logits tests above show each adapter's effect: the tiny Gemmas, their embeddings scaled by
    sqrt(hidden) and tied, repeat the prompt's last token with or without it.)"""
    _, model_dir, hf, paths = arch_set
    engine = engine_on(model_dir, plain_tokenizer, served_model_name="tiny")
    engine.load_adapter("lora_all", str(paths["lora_all"]))
    prompt = [17, 230, 5, 402, 61]
    want = {"tiny": forward_greedy(hf, prompt, 6), "lora_all": peft_greedy(hf, paths["lora_all"], prompt, 6)}
    with LiveServer(AsyncEngine(engine)) as server:
        for model, ids in want.items():
            r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                                 "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            text = plain_tokenizer.decode(prompt + ids)[len(plain_tokenizer.decode(prompt)):]  # " t70 t332 ..."
            assert r.json()["choices"][0]["text"] == text, model


@pytest.mark.parametrize("model_type,says", [
    ("qwen3_moe", "a mixture-of-experts base"), ("gemma3", "a vision-language model"), ("gpt2", "not supported")])
def test_an_unsupported_model_type_is_one_line_naming_it(model_type, says, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*{says}.*supported: llama, mistral, qwen2, qwen3"):
        ModelConfig.from_dir(tmp_path)
