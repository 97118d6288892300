"""Bottleneck adapters (AdapterHub seq_bn / double_seq_bn) against the reference module, in a
batch that also holds base, LoRA and prompt rows."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from bottleneck_ref import DOUBLE_SEQ_BN, SEQ_BN, make_bottleneck, reference_logits
from conftest import capture_logits
from peft_fixtures import peft_logits

from adapters.errors import AdapterError
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

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
    engine = LLMEngine(EngineConfig(model=str(base_dir), num_kv_blocks=256, block_size=4), tokenizer=tokenizer)
    for name, (path, _) in bottlenecks.items():
        engine.load_adapter(name, str(path))
    others = {"dora": lora_paths["dora"], "ptuning_v2": prompt_paths["ptuning_v2"],
              "prompt_tuning": prompt_paths["prompt_tuning"]}
    for name, path in others.items():
        engine.load_adapter(name, str(path))
    seen = capture_logits(engine)
    rows = [None, *bottlenecks, *others, "pfeiffer", None]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (3 + 2 * i,), generator=g).tolist() for i in range(len(rows))]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), adapter=a)
            for p, a in zip(prompts, rows)]
    while engine.has_work():
        engine.step()
    for name, p, seq in zip(rows, prompts, seqs):
        ids = p + seq.output_ids[:1]
        with torch.no_grad():
            base = hf(torch.tensor([ids])).logits[0].float()
        if name in bottlenecks:
            ref, atol = reference_logits(hf, bottlenecks[name][1], ids), 1e-5
        elif name in others:
            ref, atol = peft_logits(hf, others[name], ids), 1e-4
        else:
            ref, atol = base, 1e-4
        for step, pos in ((0, len(p) - 1), (1, len(p))):
            err = (seen[step][seq.request_id] - ref[pos]).abs().max().item()
            assert err <= atol, f"{name or 'base'} step {step}: max abs diff {err}"
        if name in bottlenecks:
            assert (ref[len(p) - 1] - base[len(p) - 1]).abs().max().item() > 1e-3, name
    assert set(engine.adapter_names()) == set(bottlenecks) | set(others)


@pytest.mark.parametrize("change,needle", [
    (dict(ln_after=True), "ln_after"), (dict(use_gating=True), "use_gating"), (dict(is_parallel=True), "is_parallel"),
    (dict(original_ln_after=False), "original_ln_after"), (dict(non_linearity="sigmoid"), "non_linearity"),
    (dict(scaling="learned"), "scaling"), (dict(architecture="lora"), "architecture"),
])
def test_unsupported_bottleneck_settings_are_refused(change, needle, bottlenecks, tiny_models, tokenizer, tmp_path):
    base_dir, _ = tiny_models["llama_gqa"]
    engine = LLMEngine(EngineConfig(model=str(base_dir), num_kv_blocks=64, block_size=4), tokenizer=tokenizer)
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
    engine = LLMEngine(EngineConfig(model=str(base_dir), num_kv_blocks=64, block_size=4), tokenizer=tokenizer)
    bad = tmp_path / "bad"
    shutil.copytree(bottlenecks["houlsby"][0], bad)
    (bad / "adapter.safetensors").rename(bad / "pytorch_adapter.bin")
    with pytest.raises(AdapterError, match="pickle"):
        engine.load_adapter("bad", str(bad))
