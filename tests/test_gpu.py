"""The engine on a CUDA GPU against PEFT: every family in one mixed batch with base rows, and Gemma 2's
windowed, soft-capped attention beside a prefix adapter, through the Triton kernels, in float32 (tight)
and bfloat16 (the GPU default, stated tolerance). Runs where torch
sees a GPU (make gpu-check); on a machine without one there is nothing for it to run on."""
from __future__ import annotations

import pytest
import torch
from bottleneck_ref import SEQ_BN, make_bottleneck, reference_logits
from helpers import make_tiny_model
from peft import PrefixTuningConfig, TaskType
from peft_fixtures import make_prompt_adapter, peft_logits

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run by make gpu-check")

# max |logit difference| from PEFT's float32 logits, relative to the largest one: float32 through the Triton
# kernels (exact fp32 dots) measured 1e-6 on the CPU interpreter; bfloat16 (8-bit mantissas through two
# random layers) measured 4.6% there
TOLERANCE = {"float32": 1e-3, "bfloat16": 8e-2}
DEVICE = "cuda"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_family_on_the_gpu_matches_peft(tiny_lora_set, tiny_prompt_set, plain_tokenizer, tmp_path, dtype):
    base_dir, hf, lora_paths = tiny_lora_set
    _, _, prompt_paths = tiny_prompt_set
    modules = make_bottleneck(hf, tmp_path / "bn", "bn", SEQ_BN, seed=3)
    paths = {**lora_paths, **prompt_paths, "bn": tmp_path / "bn"}
    engine = LLMEngine(EngineConfig(model=str(base_dir), device=DEVICE, dtype=dtype, num_kv_blocks=256, block_size=16,
                                    max_loras=len(lora_paths)), tokenizer=plain_tokenizer)
    check_rows(engine, hf, paths, dtype, {"bn": lambda ids: reference_logits(hf, modules, ids)})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_windowed_soft_capped_attention_on_the_gpu_matches_peft(plain_tokenizer, tmp_path, dtype):
    """Gemma 2's sliding window (5 keys: shorter than the prompts, and a prefix adapter's 7 keys counted in
    it) and attention logit soft-cap, through the Triton kernel."""
    hf = make_tiny_model(tmp_path / "model", "gemma2")
    prefix = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7)
    make_prompt_adapter(hf, tmp_path / "prefix", prefix, seed=2)
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "model"), device=DEVICE, dtype=dtype, num_kv_blocks=64,
                                    block_size=16, max_loras=2), tokenizer=plain_tokenizer)
    check_rows(engine, hf, {"prefix": tmp_path / "prefix"}, dtype)


def check_rows(engine, hf, paths: dict, dtype: str, custom: dict | None = None) -> None:
    """Base rows and one row per adapter of `paths` in one batch through the Triton kernels: each step's
    logits equal transformers' (base rows), custom[name](ids), or PEFT's, within TOLERANCE."""
    assert engine.kernels == "triton"
    custom = custom or {}
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    seen = []
    engine.observers.append(lambda step, logits: seen.append(
        {seq.request_id: logits[pos].float().cpu() for seq, pos in zip(step.sampled, step.sample_index.tolist())}))
    g = torch.Generator().manual_seed(0)
    rows = [None, *paths]
    prompts = {f"r{i}": torch.randint(3, hf.config.vocab_size, (3 + 2 * i,), generator=g).tolist()
               for i in range(len(rows))}
    seqs = {rid: engine.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                    adapter=rows[i], request_id=rid) for i, (rid, p) in enumerate(prompts.items())}
    while engine.has_work():
        assert all(out.error is None for out in engine.step())
    for i, (rid, prompt) in enumerate(prompts.items()):
        ids = prompt + seqs[rid].output_ids[:1]
        name = rows[i]
        with torch.no_grad():
            if name is None:
                ref = hf(torch.tensor([ids])).logits[0].float()
            elif name in custom:
                ref = custom[name](ids)
            else:
                ref = peft_logits(hf, paths[name], ids)
        for step, pos in ((0, len(prompt) - 1), (1, len(prompt))):
            ours = seen[step][rid]
            err = (ours - ref[pos]).abs().max().item()
            assert err <= TOLERANCE[dtype] * ref[pos].abs().max().item(), (name or "base", step, err)
