"""The engine on a CUDA GPU against PEFT: every family in one mixed batch with base rows, through the
Triton kernels, in float32 (tight) and bfloat16 (the GPU default, stated tolerance). Runs where torch
sees a GPU (make gpu-check); on a machine without one there is nothing for it to run on."""
from __future__ import annotations

import pytest
import torch
from bottleneck_ref import SEQ_BN, make_bottleneck, reference_logits
from peft_fixtures import peft_logits

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run by make gpu-check")

# max |logit difference| from PEFT's float32 logits, relative to the largest one: float32 through the Triton
# kernels (exact fp32 dots) measured 1e-6 on the CPU interpreter; bfloat16 (8-bit mantissas through two
# random layers) measured 4.6% there
TOLERANCE = {"float32": 1e-3, "bfloat16": 8e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_family_on_the_gpu_matches_peft(tiny_lora_set, tiny_prompt_set, plain_tokenizer, tmp_path, dtype):
    base_dir, hf, lora_paths = tiny_lora_set
    _, _, prompt_paths = tiny_prompt_set
    modules = make_bottleneck(hf, tmp_path / "bn", "bn", SEQ_BN, seed=3)
    paths = {**lora_paths, **prompt_paths, "bn": tmp_path / "bn"}
    engine = LLMEngine(EngineConfig(model=str(base_dir), device="cuda", dtype=dtype, num_kv_blocks=256, block_size=16,
                                    max_loras=len(lora_paths)), tokenizer=plain_tokenizer)
    assert engine.kernels == "triton"
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
            elif name == "bn":
                ref = reference_logits(hf, modules, ids)
            else:
                ref = peft_logits(hf, paths[name], ids)
        for step, pos in ((0, len(prompt) - 1), (1, len(prompt))):
            ours = seen[step][rid]
            err = (ours - ref[pos]).abs().max().item()
            assert err <= TOLERANCE[dtype] * ref[pos].abs().max().item(), (name or "base", step, err)
