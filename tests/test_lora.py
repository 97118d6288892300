"""LoRA serving against HF PEFT: every variant, mixed in one batch with base rows."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import FP32_ATOL_30_LAYERS, all_blocks_free, check_mixed_batch, run_staggered
from peft_fixtures import lora_variants, make_adapter, peft_greedy

from quiver.adapters.errors import AdapterError
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.families.errors import UnknownAdapter
from quiver.server.engine.sampling import SamplingParams


def lora_engine(model_dir, tokenizer, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=str(model_dir), **{"dtype": "float32", **kw}), tokenizer=tokenizer)


def test_every_variant_matches_peft_in_one_mixed_batch(tiny_lora_set, tokenizer):
    base_dir, hf, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer, max_loras=8, max_lora_rank=16)
    check_mixed_batch(engine, hf, paths, hf.config.vocab_size)


@pytest.mark.slow
def test_every_variant_matches_peft_on_smollm2(smollm2_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    paths = {}
    for i, (name, cfg) in enumerate(lora_variants(hf.config.num_hidden_layers).items()):
        # 5% magnitude noise on every DoRA column of 30 layers: with more, PEFT's own fp32 logits
        # already drift ~3e-5 from a float64 run, and the two fp32 computations ~1e-4 from each other
        make_adapter(hf, tmp_path / name, cfg, seed=200 + i, scale=0.05, magnitude_noise=0.05)
        paths[name] = tmp_path / name
    engine = lora_engine(smollm2_dir, tokenizer, max_loras=8, max_model_len=256, block_size=16, num_kv_blocks=64)
    check_mixed_batch(engine, hf, paths, hf.config.vocab_size, atol=FP32_ATOL_30_LAYERS, fp64_arbiter=True)


def test_more_adapters_than_slots_all_match_and_stay_within_limit(tiny_lora_set, tokenizer):
    base_dir, hf, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer, max_loras=2, max_num_seqs=6)
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    per_step = []  # the LoRA adapters of each step
    engine.observers.append(lambda step, _: per_step.append({seq.slot_adapter for seq, _ in step.rows} - {None}))
    names = list(paths)
    g = torch.Generator().manual_seed(5)
    arrivals = [(i // 3, torch.randint(3, 512, (4 + i % 5,), generator=g).tolist(),
                 SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)) for i in range(16)]
    adapters = [names[i % len(names)] if i % 4 else None for i in range(16)]
    engine_add = engine.add_request
    engine.add_request = lambda p, params, request_id=None: engine_add(
        p, params, adapter=adapters[int(request_id[1:])], request_id=request_id)
    got = run_staggered(engine, arrivals)
    assert max(len(s) for s in per_step) <= 2
    assert engine.stats().adapter_evictions["device"] > 0
    for i, (_, prompt, _) in enumerate(arrivals):
        want = peft_greedy(hf, paths[adapters[i]], prompt, 5) if adapters[i] else \
            hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt):].tolist()
        assert got[f"r{i}"] == want, (i, adapters[i])
    assert all_blocks_free(engine)


def test_blocked_adapter_is_not_starved(tiny_lora_set, tokenizer):
    """A steady stream for adapters A and B must not keep C out for ever with --max-loras 2."""
    base_dir, hf, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer, max_loras=2, lora_starvation_steps=4)
    a, b, c = list(paths)[:3]
    for name in (a, b, c):
        engine.load_adapter(name, str(paths[name]))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request([5, 6], params, adapter=a)
    engine.add_request([5, 6], params, adapter=b)
    target = engine.add_request([7, 8], params, adapter=c)
    for step in range(60):
        engine.add_request([9, 10], params, adapter=(a, b)[step % 2])  # keeps A and B busy
        engine.step()
        if target.finished:
            break
    assert target.finished and target.num_output_tokens == 6


def test_unknown_adapter_and_adapter_listing(tiny_lora_set, tokenizer):
    base_dir, _, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer)
    engine.load_adapter("one", str(paths["lora_qv"]))
    assert engine.adapter_names() == ["one"]
    with pytest.raises(UnknownAdapter):
        engine.add_request([1, 2], SamplingParams(), adapter="two")
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("one", str(paths["dora"]))


# ---- refused checkpoints ---------------------------------------------------------------------

def _edit_config(path, **changes):
    import json
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def _retensor(path, fn):
    from safetensors.torch import load_file, save_file
    file = path / "adapter_model.safetensors"
    save_file(fn(load_file(str(file))), str(file))


def _copy(paths, tmp_path, name="lora_qv"):
    dst = tmp_path / f"bad_{name}"
    shutil.copytree(paths[name], dst)
    return dst


REFUSALS = {
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "lora_bias": (lambda p: _edit_config(p, lora_bias=True), "lora_bias"),
    "bias": (lambda p: _edit_config(p, bias="all"), "bias"),
    "unknown_peft_type": (lambda p: _edit_config(p, peft_type="LOHA"), "peft_type"),
    "embedding_lora": (lambda p: _retensor(p, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                                        torch.zeros(4, 512)}), "embed_tokens"),
    "lm_head_lora": (lambda p: _retensor(p, lambda t: {**t, "base_model.model.lm_head.lora_A.weight":
                                                      torch.zeros(4, 64)}), "lm_head"),
    "missing_module": (lambda p: _retensor(p, lambda t: {
        k.replace("q_proj", "qq_proj"): v for k, v in t.items()}), "qq_proj"),
    "shape_mismatch": (lambda p: _retensor(p, lambda t: {
        k: (v[:, :-1].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()}), "do not match"),
    "nan_weights": (lambda p: _retensor(p, lambda t: {
        k: (v * float("nan") if "v_proj.lora_B" in k else v) for k, v in t.items()}), "NaN"),
    "pickle_only": (lambda p: ((p / "adapter_model.safetensors").rename(p / "adapter_model.bin")), "pickle"),
    "truncated": (lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:100]), "cannot be read"),
    "no_config": (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_checkpoints_name_the_problem_and_change_nothing(case, tiny_lora_set, tokenizer, tmp_path):
    base_dir, _, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer)
    engine.load_adapter("good", str(paths["lora_qv"]))
    bad = _copy(paths, tmp_path)
    mutate, needle = REFUSALS[case]
    mutate(bad)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("bad", str(bad))
    assert needle in str(e.value) and str(bad) in str(e.value)
    assert engine.adapter_names() == ["good"]
    seq = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), adapter="good")
    while engine.has_work():
        engine.step()
    assert seq.num_output_tokens == 3  # still serving


def test_rank_over_limit_is_refused(tiny_lora_set, tokenizer):
    base_dir, _, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer, max_lora_rank=8)
    with pytest.raises(AdapterError, match="rank 16 exceeds --max-lora-rank 8"):
        engine.load_adapter("big", str(paths["lora_r16_ko"]))
    assert engine.adapter_names() == []


def test_pickle_only_with_allow_pickle_and_size_limit(tiny_lora_set, tokenizer, tmp_path):
    from safetensors.torch import load_file

    base_dir, _, paths = tiny_lora_set
    pickled = _copy(paths, tmp_path)
    st = pickled / "adapter_model.safetensors"
    torch.save(load_file(str(st)), pickled / "adapter_model.bin")
    st.unlink()
    with pytest.raises(AdapterError, match="--allow-pickle"):
        lora_engine(base_dir, tokenizer).load_adapter("p", str(pickled))
    engine = lora_engine(base_dir, tokenizer, allow_pickle=True)
    engine.load_adapter("p", str(pickled))
    engine.load_adapter("s", str(paths["lora_qv"]))
    pa, sa = (engine.read_adapter(n, str(p)).result().adapter.adapter for n, p in (("p", pickled),
                                                                                   ("s", paths["lora_qv"])))
    assert all(torch.equal(pa.modules[k].b, sa.modules[k].b) for k in sa.modules)
    with pytest.raises(AdapterError, match="size limit"):
        lora_engine(base_dir, tokenizer, max_adapter_mb=0).load_adapter("s", str(paths["lora_qv"]))


def test_files_linked_out_of_the_adapter_folder_are_refused(tiny_lora_set, tokenizer, tmp_path):
    """A symlink inside an adapter folder that resolves outside it (another tenant's weights, any file the
    server can read) is refused by name; a link to a file inside the folder reads."""
    base_dir, _, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer)
    outside = tmp_path / "outside"
    shutil.copytree(paths["lora_qv"], outside)  # the same files: only where they lie is wrong
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        folder = tmp_path / name.split(".")[0]
        shutil.copytree(paths["lora_qv"], folder)
        (folder / name).unlink()
        (folder / name).symlink_to(outside / name)
        with pytest.raises(AdapterError, match=f"{name} links out of its adapter folder"):
            engine.load_adapter(folder.name, str(folder))
    inside = tmp_path / "inside"
    shutil.copytree(paths["lora_qv"], inside)
    (inside / "adapter_model.safetensors").rename(inside / "weights.safetensors")
    (inside / "adapter_model.safetensors").symlink_to("weights.safetensors")
    assert engine.load_adapter("inside", str(inside))["name"] == "inside"


def test_mixed_batch_through_the_triton_lora_kernels(tiny_lora_set, tokenizer):
    """The engine with the Triton ops (interpreted on CPU): their slot layout ([L, R, out] B, not the
    CPU's block-diagonal one) written by the LoRA family and read by SGMV/BGMV, against PEFT."""
    base_dir, hf, paths = tiny_lora_set
    engine = lora_engine(base_dir, tokenizer, kernels="triton")
    assert engine.kernels == "triton"
    check_mixed_batch(engine, hf, {k: paths[k] for k in ("rank_pattern", "dora")}, hf.config.vocab_size)


def test_dora_factor_is_computed_where_the_base_weight_lives():
    """With W on a CUDA device (faked: FakeTensorMode tracks devices and raises on a cross-device op, on a
    machine without a GPU), DoRA's norm runs there and g comes back to the CPU; and the values are right."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from quiver.adapters.lora import dora_factor

    g = torch.Generator().manual_seed(0)
    w, a, b, m = torch.randn(8, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(8, 2, generator=g), \
        torch.rand(8, generator=g)
    torch.testing.assert_close(dora_factor(w, a, b, m), m / torch.linalg.norm(w + b @ a, dim=1))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        w_gpu = torch.empty(8, 4, device="cuda")
        a_, b_, m_ = (mode.from_tensor(t) for t in (a, b, m))
        out = dora_factor(w_gpu, a_, b_, m_)
        assert out.device.type == "cpu" and out.shape == (8,)
        with pytest.raises(Exception, match="device"):  # the harness catches the mistake this guards against
            torch.linalg.norm(w_gpu + b_ @ a_, dim=1)
