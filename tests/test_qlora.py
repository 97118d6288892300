"""QLoRA: a base quantized by bitsandbytes (as transformers' load_in_4bit does) and saved, adapters made
by PEFT on that 4-bit base, served with the base kept 4-bit. The oracle is transformers + PEFT on the
bitsandbytes model, forced onto bitsandbytes' fp32 path (dequantize, then matmul).

bitsandbytes 0.50's eval forward on a CPU with AVX512-BF16 repacks the weights in place and computes in
bf16 (logits off by up to 0.6, depending on the host): the reference turns that off before its first
forward, saves the checkpoint before any forward, and asserts afterwards that nothing was repacked.
Its CPU dequantize kernel also misreads rows whose length is not a multiple of the block size, so the
tiny model here has in_features divisible by 64; the odd shapes are checked against its generic kernel.
"""
from __future__ import annotations

import json
import re
import shutil

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers import LiveServer, capture_logits, check_mixed_batch, make_tiny_model
from peft import PeftModel

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams
from quiver.server.model.fourbit import Scratch, Weight4bit, quantize, read_packed

QUANTS = [("nf4", True), ("fp4", False)]


def bnb_4bit(src, out, quant_type: str, double_quant: bool):
    """transformers' load_in_4bit on `src`, saved to `out` before any forward; the model on bnb's fp32 path."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    model.save_pretrained(out)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def assert_fp32_path(model) -> None:
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert states and not any(getattr(s, "packing_format_for_cpu", False) for s in states)


@pytest.fixture(scope="module", params=QUANTS, ids=lambda q: f"{q[0]}{'-double' if q[1] else ''}")
def qlora_set(request, tmp_path_factory):
    """(fp32 source dir, 4-bit dir, bnb HF model, adapter name -> dir, quant type)."""
    from peft_fixtures import lora_variants, make_adapter, make_prompt_adapter, prompt_variants

    root = tmp_path_factory.mktemp("qlora")
    make_tiny_model(root / "src", "llama_gqa", intermediate_size=128)
    hf = bnb_4bit(root / "src", root / "q", *request.param)
    loras, prompts = lora_variants(2), prompt_variants()
    paths = {}
    for i, name in enumerate(["rslora_all7", "dora", "adalora", "lora_qv", "dora_mlp"]):
        make_adapter(hf, root / name, loras[name], seed=300 + i)
        paths[name] = root / name
    for i, name in enumerate(["prompt_tuning", "ptuning_v2"]):
        make_prompt_adapter(hf, root / name, prompts[name], seed=400 + i)
        paths[name] = root / name
    return root / "src", root / "q", hf, paths, request.param


def engine_on(model_dir, tokenizer, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), num_kv_blocks=128, block_size=4,
                                  max_model_len=128,
                                  max_lora_rank=16, **kw), tokenizer=tokenizer)


def test_mixed_batch_logits_equal_peft_on_bitsandbytes(qlora_set, plain_tokenizer):
    _, qdir, hf, paths, (quant_type, _) = qlora_set
    engine = engine_on(qdir, plain_tokenizer)
    assert engine.quantization == quant_type
    assert engine.runner.model.layers[0].qkv.__class__ is Weight4bit  # kept 4-bit, not expanded at load
    check_mixed_batch(engine, hf, paths, vocab=512, atol=1e-4)
    assert_fp32_path(hf)


def test_quantizing_at_load_equals_the_saved_checkpoint(qlora_set, plain_tokenizer):
    src, qdir, _, paths, (quant_type, double_quant) = qlora_set
    logits = []
    for model_dir, kw in ((qdir, {}), (src, {"quantization": quant_type, "double_quant": double_quant})):
        engine = engine_on(model_dir, plain_tokenizer, **kw)
        engine.load_adapter("dora", str(paths["dora"]))
        seen = capture_logits(engine)
        engine.add_request([5, 17, 200, 33, 4, 99], SamplingParams(max_tokens=3, temperature=0), adapter="dora",
                           request_id="r")
        while engine.has_work():
            engine.step()
        logits.append(torch.stack([s["r"] for s in seen]))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_dequantize_equals_bitsandbytes_on_odd_shapes(quant_type, double_quant):
    torch.manual_seed(0)
    for shape in [(60, 77), (7, 9), (33, 1)]:  # odd rows: bitsandbytes takes its generic (flat-block) kernel
        w = torch.randn(shape) * 0.3
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        ours = quantize(w, quant_type, double_quant)
        assert torch.equal(ours.data, data.reshape(-1))
        assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(data, state)), shape


def _saved_4bit(key: str, state_edit=None, **replace) -> dict:
    """A 4-bit weight as transformers saves it (bitsandbytes' packed quant state), with entries replaced."""
    data, state = bnbf.quantize_4bit(torch.randn(8, 128), blocksize=64, compress_statistics=True, quant_type="nf4")
    saved = {key: data, **{f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}}
    if state_edit is not None:
        blob = f"{key}.quant_state.bitsandbytes__nf4"
        meta = json.loads(bytes(saved[blob].tolist()).decode())
        state_edit(meta)
        saved[blob] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return {**saved, **{f"{key}.{k}" if k != "data" else key: v for k, v in replace.items()}}


@pytest.mark.parametrize("state_edit,replace,says", [
    (None, {"quant_map": torch.zeros(15)}, "code table of 15"),
    (lambda m: m.update(blocksize=0), {}, "blocksize 0"),
    (lambda m: m.update(blocksize=-64), {}, "blocksize -64"),
    (lambda m: m.update(nested_blocksize=0), {}, "nested_blocksize 0"),
    (None, {"nested_quant_map": torch.zeros(16)}, "nested code table of 16"),
    (None, {"nested_absmax": torch.ones(3)}, "nested_absmax"),
    (None, {"absmax": torch.zeros(3, dtype=torch.uint8)}, "absmax"),
    (None, {"data": torch.zeros(10, 1, dtype=torch.uint8)}, "packed data"),
    (lambda m: m.update(shape=[8, 0]), {}, "shape"),
])
def test_malformed_4bit_metadata_is_a_clear_error_naming_the_tensor(state_edit, replace, says):
    key = "model.layers.0.self_attn.q_proj.weight"
    assert read_packed(_saved_4bit(key), key).shape == (8, 128)  # the unedited weight reads
    with pytest.raises(ValueError, match=re.escape(key) + ".*" + re.escape(says)):
        read_packed(_saved_4bit(key, state_edit, **replace), key)


def test_a_4bit_weight_whose_shape_differs_from_the_config_is_refused(qlora_set, plain_tokenizer, tmp_path):
    """Consistent 4-bit metadata for a shape the config does not describe: refused at load, naming the tensor."""
    _, q_dir, *_ = qlora_set
    edited = tmp_path / "edited"
    shutil.copytree(q_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["intermediate_size"] += 64
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_proj\.weight: a 4-bit weight of shape \(128, \d+\), "
                                         r"the model's config needs \(192, \d+\)"):
        engine_on(edited, plain_tokenizer)


def test_tiles_compute_the_same_product_as_the_whole_weight():
    torch.manual_seed(1)
    parts = [quantize(torch.randn(rows, 128) * 0.2) for rows in (48, 16, 80)]
    whole = torch.cat([p.dequantize() for p in parts])
    x, bias = torch.randn(5, 128), torch.randn(144)
    want = F.linear(x, whole, bias)
    for tile in (128, 1024, 1 << 20):  # 1 row at a time, 8 rows spanning parts, everything at once
        scratch = Scratch("cpu")
        fused = Weight4bit(parts, scratch, tile_elements=tile)
        scratch.reserve(fused.scratch_elements)
        assert fused.scratch_elements <= max(tile, 128)
        assert torch.allclose(fused.linear(x, bias), want, atol=1e-5, rtol=0)


def test_greedy_text_over_http_equals_peft_on_bitsandbytes(tokenizer, tmp_path):
    from peft import LoraConfig
    from peft_fixtures import ALL7, forward_greedy, make_adapter

    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.metrics import Metrics

    make_tiny_model(tmp_path / "src", "llama_gqa", vocab_size=49152, intermediate_size=128)  # SmolLM2's vocabulary
    hf = bnb_4bit(tmp_path / "src", tmp_path / "q", "nf4", True)
    make_adapter(hf, tmp_path / "qlora", LoraConfig(r=8, lora_alpha=16, target_modules=ALL7), seed=7)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path / "q"), num_kv_blocks=256, block_size=8,
                                    max_model_len=128,
                                    served_model_name="tiny-nf4"), tokenizer=tokenizer)
    engine.load_adapter("qlora", str(tmp_path / "qlora"))
    prompt = "The capital of France is"
    ids = tokenizer(prompt).input_ids
    with LiveServer(AsyncEngine(engine, Metrics())) as server:
        got = {name: httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
            for name in ("tiny-nf4", "qlora")}
        models = httpx.get(server.url + "/v1/models").json()["data"]
    peft = PeftModel.from_pretrained(hf, tmp_path / "qlora").eval()
    want = {"qlora": forward_greedy(peft, ids, 12)}
    peft.unload()
    want["tiny-nf4"] = forward_greedy(hf, ids, 12)
    assert want["qlora"] != want["tiny-nf4"]
    for name, body in got.items():
        assert body["choices"][0]["text"] == tokenizer.decode(want[name]), name
    assert {m["id"]: m.get("quantization") for m in models}["tiny-nf4"] == "nf4"
    assert_fp32_path(hf)


def test_merge_onto_the_4bit_base_writes_a_plain_model(qlora_set, plain_tokenizer, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from quiver.server.merge import check_merge, merge_adapters

    _, qdir, _, paths, _ = qlora_set
    adapters = [(paths["dora"], 1.0), (paths["rslora_all7"], 0.5)]
    out = merge_adapters(qdir, adapters, tmp_path / "merged", torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    prompt = [5, 17, 200, 33, 4, 99]
    assert check_merge(qdir, out, adapters, prompts=(prompt,), tokenizer=plain_tokenizer) <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    engine = engine_on(out, plain_tokenizer)
    seen = capture_logits(engine)
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0), request_id="r")
    engine.step()
    with torch.no_grad():
        assert (plain(torch.tensor([prompt])).logits[0, -1] - seen[0]["r"]).abs().max() <= 1e-4


@pytest.mark.slow
def test_smollm2_nf4_mixed_batch_equals_peft_on_bitsandbytes(smollm2_dir, tokenizer, tmp_path):
    from peft import LoraConfig
    from peft_fixtures import ALL7, make_adapter

    hf = bnb_4bit(smollm2_dir, tmp_path / "q", "nf4", True)
    make_adapter(hf, tmp_path / "qlora", LoraConfig(r=8, lora_alpha=16, target_modules=ALL7), seed=11, scale=0.02)
    make_adapter(hf, tmp_path / "qdora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
                 seed=12, scale=0.02)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path / "q"), num_kv_blocks=64, block_size=16,
                                    max_model_len=256),
                       tokenizer=tokenizer)
    assert engine.quantization == "nf4"
    check_mixed_batch(engine, hf, {"qlora": tmp_path / "qlora", "qdora": tmp_path / "qdora"}, vocab=49152, atol=1e-4)
    assert_fp32_path(hf)


def test_quantized_embeddings_equal_the_model_with_their_dequantized_table(qlora_set, plain_tokenizer, tmp_path):
    """--quantize-embeddings leaves bitsandbytes' model; its own oracle is that model with the (tied)
    embedding table replaced by bitsandbytes' quantize-dequantize of it."""
    src, _, _, paths, (quant_type, double_quant) = qlora_set
    hf = bnb_4bit(src, tmp_path / "q", quant_type, double_quant)
    table = hf.model.embed_tokens.weight
    with torch.no_grad():
        table.copy_(bnbf.dequantize_4bit(*bnbf.quantize_4bit(table.detach().clone(), blocksize=64, quant_type=quant_type,
                                                             compress_statistics=double_quant)))
    engine = engine_on(tmp_path / "q", plain_tokenizer, quantize_embeddings=True, double_quant=double_quant)
    assert isinstance(engine.runner.model.embed, Weight4bit)
    check_mixed_batch(engine, hf, {n: paths[n] for n in ("rslora_all7", "dora", "prompt_tuning", "ptuning_v2")},
                      vocab=512, atol=1e-4)
    assert_fp32_path(hf)
