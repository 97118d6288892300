"""The tests' oracles checked against each other, so that an upstream change to either shows up
here, by name, rather than as a mystery in a Quiver test."""
from __future__ import annotations

from helpers import hf_greedy
from peft_fixtures import forward_greedy, peft_generate, peft_greedy

PROMPT = [101, 202, 303, 44, 5]


def test_forward_loop_equals_peft_generate_for_lora(tiny_lora_set):
    """For LoRA-type adapters PEFT's `generate` is a trusted path: the forward loop must agree with it."""
    _, hf, paths = tiny_lora_set
    eos = hf.generation_config.eos_token_id
    outputs = {}
    for name in ("lora_qv", "rslora_all7", "dora", "adalora"):
        outputs[name] = peft_greedy(hf, paths[name], PROMPT, 12, eos_token_id=eos)
        assert outputs[name] == peft_generate(hf, paths[name], PROMPT, 12), name
    base = hf_greedy(hf, PROMPT, 12)
    assert forward_greedy(hf, PROMPT, 12, eos_token_id=eos) == base
    assert any(out != base for out in outputs.values())  # the adapters change the text: the check means something


def test_forward_loop_stops_after_eos(tiny_lora_set):
    _, hf, paths = tiny_lora_set
    free = peft_greedy(hf, paths["lora_qv"], PROMPT, 8)
    assert len(free) == 8
    stop = free.index(free[3])  # the first time that token appears
    assert peft_greedy(hf, paths["lora_qv"], PROMPT, 8, eos_token_id=free[3]) == free[:stop + 1]
