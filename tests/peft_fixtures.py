"""PEFT adapters with non-zero random weights, saved as `save_pretrained` writes them."""
from __future__ import annotations

import torch
from peft import (AdaLoraConfig, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
                  PromptTuningConfig, TaskType, get_peft_model)

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_variants(num_layers: int) -> dict[str, object]:
    """Eight adapters of different kinds, ranks and targets."""
    return {
        "lora_qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rslora_all7": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL7),
        "rank_pattern": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "down_proj"],
                                   rank_pattern={"k_proj": 2, f"model.layers.{num_layers - 1}.mlp.down_proj": 12},
                                   alpha_pattern={"down_proj": 24}),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "adalora": AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=10, tinit=1, tfinal=2,
                                 target_modules=["q_proj", "v_proj", "gate_proj"]),
        "lora_r1_mlp": LoraConfig(r=1, lora_alpha=2, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "lora_r16_ko": LoraConfig(r=16, lora_alpha=32, target_modules=["k_proj", "o_proj"]),
        "dora_mlp": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["up_proj", "down_proj"]),
    }


def prompt_variants() -> dict[str, object]:
    """The prompt-learning families, with different numbers of virtual tokens."""
    lm = TaskType.CAUSAL_LM
    return {
        "prompt_tuning": PromptTuningConfig(task_type=lm, num_virtual_tokens=5),
        "ptuning_mlp": PromptEncoderConfig(task_type=lm, num_virtual_tokens=4, encoder_hidden_size=32),
        "ptuning_lstm": PromptEncoderConfig(task_type=lm, num_virtual_tokens=3, encoder_hidden_size=16,
                                            encoder_reparameterization_type="LSTM"),
        "prefix_projection": PrefixTuningConfig(task_type=lm, num_virtual_tokens=6, prefix_projection=True,
                                                encoder_hidden_size=32),
        "ptuning_v2": PrefixTuningConfig(task_type=lm, num_virtual_tokens=7),
    }


def is_prompt_learning(config) -> bool:
    return isinstance(config, (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig))


def make_prompt_adapter(base, path, config, seed: int, scale: float = 1.0) -> None:
    """Random prompt encoder (embedding, MLP or LSTM), saved as PEFT saves it: the encoder's output."""
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(path)


def make_adapter(base, path, config, seed: int, scale: float = 0.1, magnitude_noise: float = 0.2) -> None:
    """Wrap `base` in place, randomise every adapter tensor, save, and unwrap again.

    DoRA magnitudes start at the weight norms; `magnitude_noise` moves them by that relative amount.
    """
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + magnitude_noise * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    if isinstance(config, AdaLoraConfig):
        # a pruned rank pattern, as AdaLoRA's rank allocator leaves it after training
        pattern = {}
        for name, p in model.named_parameters():
            if name.endswith("lora_E.default"):
                key = name.removeprefix("base_model.model.")  # as the rank allocator names them
                keep = torch.rand(p.shape[0]) < 0.6
                keep[0] = True
                pattern[key] = keep.tolist()
        model.peft_config["default"].rank_pattern = pattern
    model.save_pretrained(path)
    model.unload()


def _release(model) -> None:
    if not model.active_peft_config.is_prompt_learning:  # prompt learning leaves the base untouched
        model.unload()


def peft_logits(base, path, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    """PEFT's logits for every position of `ids` (virtual tokens dropped) with the adapter at `path`."""
    model = PeftModel.from_pretrained(base, path).eval()
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                         ).logits[0, -len(ids):].to(dtype)
    finally:
        _release(model)


def forward_greedy(model, ids: list[int], n: int, eos_token_id: int | None = None, process=None) -> list[int]:
    """Greedy tokens from a loop over `model`'s forward, the whole sequence recomputed every step.

    The oracle for generated text: it is the computation an adapter was trained with, and unlike
    PEFT's `generate` it does not depend on how a transformers release threads caches through
    prompt learning. Stops after `eos_token_id` (kept in the output, as `generate` keeps it).
    process(seq, scores) -> scores, if given, changes the last position's [1, V] float64 logits
    (seq: the prompt and the tokens so far) before the choice."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits
            scores = logits[0, -1:].double()
            if process is not None:
                scores = process(seq, scores)
            token = int(scores[0].argmax())
            seq.append(token)
            out.append(token)
            if token == eos_token_id:
                break
    return out


def peft_greedy(base, path, ids: list[int], n: int, eos_token_id: int | None = None, process=None) -> list[int]:
    """PEFT's greedy continuation of `ids` with the adapter at `path`, through its forward."""
    model = PeftModel.from_pretrained(base, path).eval()
    try:
        return forward_greedy(model, ids, n, eos_token_id, process)
    finally:
        _release(model)


def peft_generate(base, path, ids: list[int], n: int) -> list[int]:
    """PEFT's own greedy `generate`, stopping at EOS: only to check the forward-loop oracle against it."""
    model = PeftModel.from_pretrained(base, path).eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()
    finally:
        _release(model)
