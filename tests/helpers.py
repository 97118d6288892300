"""Helpers the tests share: tiny random models, the transformers oracle, staggered runs, and the
mixed-batch check against PEFT. Fixtures live in conftest.py."""
from __future__ import annotations

import torch

from quiver.bench.common import LoopbackServer as LiveServer  # noqa: F401 (re-exported for the tests)

TINY_CONFIGS = {
    # GQA, tied embeddings
    "llama_gqa": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # MHA, odd sizes, untied
    "llama_mha_odd": dict(model_type="llama", hidden_size=60, intermediate_size=77, num_hidden_layers=3,
                          num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=False),
    # MQA with llama3 rope scaling and a large theta
    "llama_mqa_rope3": dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=3, num_key_value_heads=1, rope_theta=500000.0,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=4096),
    # the other architectures (server.model.archs), each with what sets it apart turned up so that it shows:
    # windows shorter than the test prompts, soft-caps the logits reach, multipliers far from 1
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}}),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5),
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "granite": dict(model_type="granite", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.05, logits_scaling=2.5),
    "smollm3": dict(model_type="smollm3", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
}
NEW_ARCHS = ("qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3")


def make_tiny_model(path, name: str, vocab_size: int = 512, seed: int = 0, max_positions: int = 256, **overrides):
    """Save a random model of the named tiny config (with `overrides`) under `path`; return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY_CONFIGS[name], **overrides}
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=max_positions,
                               initializer_range=0.2, bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so loading them is tested
        for name_, p in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate for one unpadded prompt: the oracle."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def run_staggered(engine, arrivals: list[tuple[int, list[int], object]]) -> dict[str, list[int]]:
    """Add each (step, prompt, params) when the engine reaches that step; run to the end.

    Returns request id -> output token ids.
    """
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    outputs: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, params) = pending.pop(0)
            engine.add_request(prompt, params, request_id=f"r{i}")
            outputs[f"r{i}"] = []
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        step += 1
        assert step < 10_000, "engine did not finish"
    return outputs


def run_one(engine, adapter: str) -> None:
    """One 1-token request for `adapter`, stepped until the engine is idle (parked requests wait for a
    worker thread's read of their adapter)."""
    import time

    from quiver.server.engine.sampling import SamplingParams

    engine.add_request([5, 6, 7], SamplingParams(max_tokens=1), adapter=adapter)
    deadline = time.monotonic() + 30
    while engine.num_waiting() or engine.has_work():
        engine.step()
        time.sleep(0.005)
        assert time.monotonic() < deadline


def capture_logits(engine) -> list[dict]:
    """Record, for every step the engine runs, request id -> the logits its sampled token was drawn from."""
    seen = []

    def observe(step, logits):
        seen.append({seq.request_id: logits[pos] for seq, pos in zip(step.sampled, step.sample_index.tolist())})

    engine.observers.append(observe)
    return seen


def all_blocks_free(engine) -> bool:
    """Every KV block is free (or cached and held by nobody), as the engine reports it (EngineStats)."""
    stats = engine.stats()
    return stats.kv_blocks_free == stats.kv_blocks


def auto_cpu_dtype() -> str:
    """What --dtype auto gives on this machine's CPU: bfloat16 where it has AVX512-BF16 or AMX, else float32."""
    from quiver.server.engine.device import cpu_bf16_flag
    return "bfloat16" if cpu_bf16_flag() else "float32"


# fp32 logits of a 30-layer model (SmolLM2, magnitude ~20): transformers' MKL matmuls land ~4e-5 from a
# float64 run, the CPU path's prepacked oneDNN ones (server.model.packed), which accumulate in another
# order, ~1.7e-4 (1e-5 relative); a wrong adapter delta moves them by 1e-2 and more
FP32_ATOL_30_LAYERS = 3e-4


def check_mixed_batch(engine, hf, paths: dict, vocab: int, custom: dict | None = None, atol: float = 1e-4,
                      fp64_arbiter: bool = False):
    """Load every adapter in `paths` (name -> folder); base rows and one row per adapter prefill in
    one step and decode in the next. Each step's logits must equal the oracle's: transformers for
    base rows, PEFT for adapters, or custom[name] = (reference(ids) -> logits, tolerance).

    fp64_arbiter: where the oracle's fp32 logits (PEFT's, or transformers' for base rows) and ours
    differ by more than atol, the same computation in float64 decides: ours must then be within twice PEFT's own fp32 distance from it
    (on a 30-layer model, fp32 rounding alone moves PEFT ~1e-4 from the exact value, and another
    correct fp32 order of operations lands as far, on another side; a wrong delta is off by far more)."""
    import copy

    from peft_fixtures import peft_logits
    exact_model = []

    custom = custom or {}
    for name, path in paths.items():
        engine.load_adapter(name, str(path))
    seen = capture_logits(engine)
    rows = [None, *paths, None]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (2 + 2 * i,), generator=g).tolist() for i in range(len(rows))]
    from quiver.server.engine.sampling import SamplingParams
    seqs = [engine.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), adapter=a)
            for p, a in zip(prompts, rows)]
    while engine.has_work():
        engine.step()
    assert len(seen) == 2 and all(len(s) == len(rows) for s in seen)
    for name, p, seq in zip(rows, prompts, seqs):
        ids = p + seq.output_ids[:1]
        with torch.no_grad():
            base = hf(torch.tensor([ids])).logits[0].float()
        tol = atol
        if name is None:
            ref = base
        elif name in custom:
            ref, tol = custom[name][0](ids), custom[name][1]
        else:
            ref = peft_logits(hf, paths[name], ids)
        for step, pos in ((0, len(p) - 1), (1, len(p))):
            ours = seen[step][seq.request_id]
            err = (ours - ref[pos]).abs().max().item()
            if err > tol and fp64_arbiter and name not in custom:
                if not exact_model:
                    exact_model.append(copy.deepcopy(hf).double())
                if name is None:
                    with torch.no_grad():
                        exact = exact_model[0](torch.tensor([ids])).logits[0, pos]
                else:
                    exact = peft_logits(exact_model[0], paths[name], ids, dtype=torch.float64)[pos]
                ours_err = (ours.double() - exact).abs().max().item()
                peft_err = (ref[pos].double() - exact).abs().max().item()
                assert ours_err <= max(tol, 2 * peft_err), (f"{name or 'base'} step {step}: {err} from the fp32 "
                                                            f"oracle; float64 says ours {ours_err}, oracle {peft_err}")
                continue
            assert err <= tol, f"{name or 'base'} step {step}: max abs diff {err}"
        if name is not None:  # the adapter really changes the output, so the comparison means something
            assert (ref[len(p) - 1] - base[len(p) - 1]).abs().max().item() > 1e-3, name
        assert seq.num_output_tokens == 2


def make_tiny_gguf(path) -> None:
    """A GGUF file of the llama_gqa tiny config (float32, random) with a byte-level tokenizer of 260 tokens."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = TINY_CONFIGS["llama_gqa"]
    hidden, ffn, heads, kv = (spec[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads"))
    tokens = ["<|endoftext|>", "<s>", "</s>", *bytes_to_unicode().values(), "Ġt"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    kv_dim = kv * hidden // heads
    shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,)}
    for i in range(spec["num_hidden_layers"]):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in {
            "attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, hidden), "attn_k": (kv_dim, hidden),
            "attn_v": (kv_dim, hidden), "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}.items()}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.2).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
