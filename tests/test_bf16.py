"""bfloat16 serving, what `--dtype auto` picks on CPUs with AVX512-BF16 or AMX: SmolLM2 with LoRA, rsLoRA
and DoRA rows mixed with base rows, against transformers and PEFT run in bfloat16 too, and both against
the same computation in float32.

Stated tolerance. bfloat16 keeps 8 bits of mantissa: a bfloat16 run of SmolLM2 lands up to a few units
from the float32 logits (magnitude ~20; max over the vocabulary), PEFT's own as much as ours, and two
bfloat16 runs that round in different places land as far from each other. So PEFT's bfloat16 run is
the yardstick, the float32 run the reference. Per row and step, ours must be
  - no further from the float32 logits than max(BF16_ATOL = 1.5, twice PEFT's bfloat16 distance),
  - on average over the rows no further than 1.5x PEFT's bfloat16 distance (+ 0.05),
  - and give the float32 greedy token wherever its top two logits are further apart than our distance
    from it (a near-tie may flip in either dtype).
Every adapter moves the float32 logits by more than 2 x BF16_ATOL, so a missing or misapplied one fails.
"""
from __future__ import annotations

import pytest
import torch
from helpers import capture_logits
from peft_fixtures import lora_variants, make_adapter, peft_logits

from quiver.server.engine.config import EngineConfig
from quiver.server.engine.device import cpu_bf16_flag, resolve_dtype
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

BF16_ATOL = 1.5
VARIANTS = ("rslora_all7", "dora", "lora_r16_ko", "dora_mlp")


@pytest.mark.slow
def test_bf16_mixed_batch_matches_peft_bf16_within_stated_tolerance(smollm2_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    variants = lora_variants(fp32.config.num_hidden_layers)
    paths = {}
    for i, name in enumerate(VARIANTS):
        make_adapter(fp32, tmp_path / name, variants[name], seed=300 + i, scale=0.08, magnitude_noise=0.1)
        paths[name] = tmp_path / name
    bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), dtype="bfloat16", max_loras=4, max_model_len=256,
                                    block_size=16, num_kv_blocks=64), tokenizer=tokenizer)
    assert engine.dtype == torch.bfloat16
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    seen = capture_logits(engine)
    rows = [None, *paths, None]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, fp32.config.vocab_size, (6 + 3 * i,), generator=g).tolist() for i in range(len(rows))]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), adapter=a)
            for p, a in zip(prompts, rows)]
    while engine.has_work():
        engine.step()
    assert len(seen) == 2  # one prefill step, one decode step, every row in both

    ours_errs, peft_errs = [], []
    for name, prompt, seq in zip(rows, prompts, seqs):
        ids = prompt + seq.output_ids[:1]
        with torch.no_grad():
            base = fp32(torch.tensor([ids])).logits[0].float()
            if name is None:
                exact, theirs = base, bf16(torch.tensor([ids])).logits[0].float()
            else:
                exact = peft_logits(fp32, paths[name], ids)
                theirs = peft_logits(bf16, paths[name], ids)
                assert (exact - base).abs().max().item() > 2 * BF16_ATOL, name  # the adapter shows
        for step, pos in ((0, len(prompt) - 1), (1, len(prompt))):
            ours = seen[step][seq.request_id].float()
            assert torch.isfinite(ours).all()
            ours_errs.append((ours - exact[pos]).abs().max().item())
            peft_errs.append((theirs[pos] - exact[pos]).abs().max().item())
            where = f"{name or 'base'} step {step}: ours-fp32 {ours_errs[-1]:.3f}, PEFT bf16-fp32 {peft_errs[-1]:.3f}"
            assert ours_errs[-1] <= max(BF16_ATOL, 2 * peft_errs[-1]), where
            top2 = exact[pos].topk(2).values
            if (top2[0] - top2[1]).item() > ours_errs[-1]:
                assert int(ours.argmax()) == int(exact[pos].argmax()), where
    mean_ours, mean_peft = sum(ours_errs) / len(ours_errs), sum(peft_errs) / len(peft_errs)
    assert mean_ours <= 1.5 * mean_peft + 0.05, (mean_ours, mean_peft)


def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_matmuls(tmp_path, monkeypatch, caplog):
    """--dtype auto reads the CPU's flags once at start, and logs what it chose and why."""
    from quiver.server.engine import device

    for flags, want in (("fpu sse avx2 avx512f avx512_bf16", torch.bfloat16), ("fpu amx_bf16 amx_tile", torch.bfloat16),
                        ("fpu sse avx2 avx512f avx512_vnni", torch.float32)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(device, "cpu_bf16_flag", lambda info=info: cpu_bf16_flag(info))
        with caplog.at_level("INFO", logger="quiver.server.engine.device"):
            assert resolve_dtype("auto", torch.device("cpu"), tmp_path) == want
        assert (f"dtype {str(want).removeprefix('torch.')} (auto: this CPU has") in caplog.text
        assert resolve_dtype("float32", torch.device("cpu"), tmp_path) == torch.float32  # asked for: kept
        caplog.clear()
    assert cpu_bf16_flag(tmp_path / "absent") is None  # no /proc/cpuinfo (macOS): float32
