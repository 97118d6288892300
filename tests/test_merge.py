"""quiver merge: merged weights serve the same logits as the unmerged adapter, transformers loads
them, weighted merges agree with PEFT, prompt-family adapters are refused."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import capture_logits

from adapters.errors import AdapterError
from adapters.merge import merge_adapters
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

PROMPT = [17, 200, 33, 4, 99, 123, 7]


def last_logits(model_dir, tokenizer, adapter_path=None) -> torch.Tensor:
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=4), tokenizer=tokenizer)
    if adapter_path is not None:
        engine.load_adapter("a", str(adapter_path))
    seen = capture_logits(engine)
    engine.add_request(PROMPT, SamplingParams(max_tokens=1, temperature=0), adapter="a" if adapter_path else None,
                       request_id="r")
    engine.step()
    return seen[0]["r"]


@pytest.mark.parametrize("variant", ["lora_qv", "rank_pattern", "rslora_all7", "dora", "adalora", "dora_mlp"])
def test_merged_logits_equal_unmerged_serving(variant, tiny_lora_set, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, _, paths = tiny_lora_set
    out = merge_adapters(base_dir, [(paths[variant], 1.0)], tmp_path / "merged")
    assert (out / "MERGED.md").read_text().count(str(paths[variant])) == 1
    unmerged = last_logits(base_dir, tokenizer, paths[variant])
    merged = last_logits(out, tokenizer)
    assert (merged - unmerged).abs().max().item() <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([PROMPT])).logits[0, -1]
    assert (theirs - unmerged).abs().max().item() <= 1e-4
    assert (last_logits(base_dir, tokenizer) - unmerged).abs().max().item() > 1e-3  # the merge changed something


def test_weighted_merge_agrees_with_peft_cat(tiny_lora_set, tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel
    from peft_fixtures import make_adapter

    base_dir, hf, paths = tiny_lora_set
    make_adapter(hf, tmp_path / "second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=5)
    out = merge_adapters(base_dir, [(paths["lora_qv"], 0.7), (tmp_path / "second", 0.3)], tmp_path / "merged")
    ours = last_logits(out, tokenizer)
    model = PeftModel.from_pretrained(hf, paths["lora_qv"], adapter_name="a")
    model.load_adapter(str(tmp_path / "second"), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        theirs = model(torch.tensor([PROMPT])).logits[0, -1]
    model.unload()
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_prompt_family_merge_is_refused_and_writes_nothing(tiny_prompt_set, tmp_path):
    base_dir, _, paths = tiny_prompt_set
    for name in ("prompt_tuning", "ptuning_v2"):
        with pytest.raises(AdapterError, match="cannot be merged"):
            merge_adapters(base_dir, [(paths[name], 1.0)], tmp_path / name)
        assert not (tmp_path / name).exists()


def test_merge_cli(tiny_lora_set, tmp_path, capsys):
    from server.cli import main

    base_dir, _, paths = tiny_lora_set
    main(["merge", "--model", str(base_dir), "--adapter", str(paths["lora_qv"]), "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    assert "merged model written" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["merge", "--model", str(base_dir), "--adapter", str(paths["lora_qv"]), "--weight", "1", "--weight", "2",
              "--out", str(tmp_path / "n")])
    shutil.rmtree(tmp_path / "m")
