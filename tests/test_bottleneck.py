"""Bottleneck adapters (AdapterHub seq_bn / double_seq_bn) against the reference module, in a
batch that also holds base, LoRA and prompt rows."""
from __future__ import annotations

import json
import shutil

import pytest
from bottleneck_ref import DOUBLE_SEQ_BN, SEQ_BN, make_bottleneck, reference_logits
from helpers import check_mixed_batch, make_tiny_model

from quiver.adapters.errors import AdapterError
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine

VARIANTS = {
    "pfeiffer": SEQ_BN,
    "houlsby": dict(DOUBLE_SEQ_BN, reduction_factor=8),
    "pfeiffer_gelu": dict(SEQ_BN, non_linearity="gelu", scaling=0.5, reduction_factor=32, leave_out=[0]),
}


@pytest.fixture(scope="module")
def bottlenecks(tiny_models, tmp_path_factory):
    base_dir, hf = tiny_models["llama_gqa"]
    root = tmp_path_factory.mktemp("bottleneck")
    return {name: (root / name, make_bottleneck(hf, root / name, name, cfg, seed=800 + i))
            for i, (name, cfg) in enumerate(VARIANTS.items())}


def test_bottlenecks_match_reference_in_a_mixed_batch(bottlenecks, tiny_lora_set, tiny_prompt_set, tokenizer):
    base_dir, hf, lora_paths = tiny_lora_set
    _, _, prompt_paths = tiny_prompt_set
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=256, block_size=4),
                       tokenizer=tokenizer)
    others = {"dora": lora_paths["dora"], "rslora_all7": lora_paths["rslora_all7"], **prompt_paths}  # every family
    custom = {name: (lambda ids, mods=mods: reference_logits(hf, mods, ids), 1e-5)
              for name, (_, mods) in bottlenecks.items()}
    check_mixed_batch(engine, hf, {**{n: p for n, (p, _) in bottlenecks.items()}, **others},
                      hf.config.vocab_size, custom=custom)
    assert set(engine.adapter_names()) == set(bottlenecks) | set(others)


@pytest.mark.parametrize("change,needle", [
    (dict(ln_after=True), "ln_after"), (dict(use_gating=True), "use_gating"), (dict(is_parallel=True), "is_parallel"),
    (dict(original_ln_after=False), "original_ln_after"), (dict(non_linearity="sigmoid"), "non_linearity"),
    (dict(scaling="learned"), "scaling"), (dict(architecture="lora"), "architecture"),
])
def test_unsupported_bottleneck_settings_are_refused(change, needle, bottlenecks, tiny_models, tokenizer, tmp_path):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4),
                       tokenizer=tokenizer)
    bad = tmp_path / "bad"
    shutil.copytree(bottlenecks["pfeiffer"][0], bad)
    meta = json.loads((bad / "adapter_config.json").read_text())
    meta["config"].update(change)
    (bad / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=needle):
        engine.load_adapter("bad", str(bad))
    assert engine.adapter_names() == []


def test_pickle_only_bottleneck_is_refused(bottlenecks, tiny_models, tokenizer, tmp_path):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(base_dir), num_kv_blocks=64, block_size=4),
                       tokenizer=tokenizer)
    bad = tmp_path / "bad"
    shutil.copytree(bottlenecks["houlsby"][0], bad)
    (bad / "adapter.safetensors").rename(bad / "pytorch_adapter.bin")
    with pytest.raises(AdapterError, match="pickle"):
        engine.load_adapter("bad", str(bad))


def test_a_bottleneck_over_another_architecture_is_refused_by_name(plain_tokenizer, tmp_path):
    """Gemma's norms around each block put AdapterHub's bottleneck elsewhere: refused, not misplaced."""
    hf = make_tiny_model(tmp_path / "gemma2", "gemma2")
    make_bottleneck(hf, tmp_path / "bn", "bn", SEQ_BN, seed=1)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path / "gemma2"), num_kv_blocks=32, block_size=4,
                                    max_model_len=64), tokenizer=plain_tokenizer)
    with pytest.raises(AdapterError, match="bn: bottleneck adapters are served over llama, mistral, qwen2 bases.*"
                                           "this base is gemma2"):
        engine.load_adapter("bn", str(tmp_path / "bn"))
    assert engine.adapter_names() == []
