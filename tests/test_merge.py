"""quiver merge: merged weights serve the same logits as the unmerged adapter, transformers loads
them, weighted merges agree with PEFT, prompt-family adapters are refused."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import capture_logits

from quiver.adapters.errors import AdapterError
from quiver.server.merge import check_merge, merge_adapters
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

PROMPT = [17, 200, 33, 4, 99, 123, 7]


def last_logits(model_dir, tokenizer, adapter_path=None) -> torch.Tensor:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), num_kv_blocks=64, block_size=4),
                       tokenizer=tokenizer)
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


@pytest.fixture(scope="module")
def same_rank_pair(tiny_lora_set, tmp_path_factory):
    """Two rank-4 LoRA adapters over partly different projections (as TIES/DARE need equal ranks)."""
    from peft import LoraConfig
    from peft_fixtures import make_adapter

    base_dir, hf, _ = tiny_lora_set
    root = tmp_path_factory.mktemp("pair")
    make_adapter(hf, root / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
                 seed=5)
    make_adapter(hf, root / "b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                 seed=6)
    return base_dir, root / "a", root / "b"


@pytest.mark.parametrize("combination,density,sign", [
    ("cat", None, "total"), ("linear", None, "total"), ("ties", 0.5, "total"), ("ties", 0.3, "frequency"),
    ("dare_linear", 0.6, "total"), ("dare_ties", 0.5, "total"), ("magnitude_prune", 0.4, "total")])
def test_combined_merge_agrees_with_peft(combination, density, sign, same_rank_pair, tokenizer, tmp_path,
                                         monkeypatch):
    """Ours against PEFT's add_weighted_adapter then merge_and_unload: every weight and the logits."""
    import peft.tuners.lora.model as peft_lora
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir, a, b = same_rank_pair
    weights = [0.7, -0.4]  # a negative weight exercises the sign handling
    out = merge_adapters(base_dir, [(a, weights[0]), (b, weights[1])], tmp_path / "merged", combination=combination,
                         density=density, majority_sign=sign, seed=11)
    # PEFT draws dare's masks from the global generator right after initialising the new adapter
    freeze = peft_lora._freeze_adapter
    monkeypatch.setattr(peft_lora, "_freeze_adapter", lambda *args: (freeze(*args), torch.manual_seed(11)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), a,
                                      adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination, density=density,
                               majority_sign_method=sign)
    model.set_adapter("mix")
    theirs = model.merge_and_unload(adapter_names=["mix"]).eval()
    ours = load_file(str(out / "model.safetensors"))
    changed = 0
    for name, tensor in theirs.state_dict().items():
        if name in ours:
            assert (ours[name] - tensor).abs().max().item() <= 1e-5, name
            changed += name.endswith("q_proj.weight") and (tensor - load_file(
                str(base_dir / "model.safetensors"))[name]).abs().max().item() > 1e-4
    assert changed  # the merge moved the weights
    with torch.no_grad():
        expected = theirs(torch.tensor([PROMPT])).logits[0, -1]
    assert (last_logits(out, tokenizer) - expected).abs().max().item() <= 1e-4


def test_task_arithmetic_refuses_what_peft_does_not_define(tiny_lora_set, same_rank_pair, tmp_path):
    base_dir, _, paths = tiny_lora_set
    _, a, _ = same_rank_pair
    with pytest.raises(AdapterError, match="same rank"):
        merge_adapters(base_dir, [(a, 1.0), (paths["lora_r16_ko"], 1.0)], tmp_path / "m", combination="ties",
                       density=0.5)
    with pytest.raises(AdapterError, match="plain LoRA only"):
        merge_adapters(base_dir, [(a, 1.0), (paths["dora"], 1.0)], tmp_path / "m", combination="linear")
    with pytest.raises(AdapterError, match="--density"):
        merge_adapters(base_dir, [(a, 1.0), (a, 1.0)], tmp_path / "m", combination="dare_ties")
    assert not (tmp_path / "m").exists()


def test_check_reports_agreement_and_catches_a_wrong_merge(tiny_lora_set, tokenizer, tmp_path):
    base_dir, _, paths = tiny_lora_set
    adapters = [(paths["dora"], 0.6), (paths["rank_pattern"], 0.5)]
    good = merge_adapters(base_dir, adapters, tmp_path / "good")
    assert check_merge(base_dir, good, adapters, tokenizer=tokenizer, prompts=(PROMPT, [5, 6, 7])) <= 1e-4
    wrong = merge_adapters(base_dir, [(paths["dora"], 0.6)], tmp_path / "wrong")
    assert check_merge(base_dir, wrong, adapters, tokenizer=tokenizer, prompts=(PROMPT,)) > 1e-3


def test_prompt_family_merge_is_refused_and_writes_nothing(tiny_prompt_set, tmp_path):
    base_dir, _, paths = tiny_prompt_set
    for name in ("prompt_tuning", "ptuning_v2"):
        with pytest.raises(AdapterError, match="cannot be merged"):
            merge_adapters(base_dir, [(paths[name], 1.0)], tmp_path / name)
        assert not (tmp_path / name).exists()


def test_merge_cli(api_model, tokenizer, tmp_path, capsys):
    from peft_fixtures import lora_variants, make_adapter

    from quiver.server.cli import main

    model_dir = tmp_path / "base"  # SmolLM2's vocabulary and tokenizer, as --check prompts with text
    shutil.copytree(api_model[0], model_dir)
    tokenizer.save_pretrained(model_dir)
    variants = lora_variants(api_model[1].config.num_hidden_layers)
    for name in ("lora_qv", "adalora"):
        make_adapter(api_model[1], tmp_path / name, variants[name], seed=3)
    main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "lora_qv"), "--adapter",
          str(tmp_path / "adalora"), "--weight", "0.5", "--weight", "1.5", "--out", str(tmp_path / "m"), "--check"])
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "merged model written" in out
    diff = float(out.split("merged vs served unmerged, ")[1].split()[0])
    assert 0 <= diff <= 1e-4
    with pytest.raises(SystemExit):
        main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "lora_qv"), "--weight", "1",
              "--weight", "2", "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()
