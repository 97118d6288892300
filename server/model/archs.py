"""What sets each supported architecture apart from the Llama decoder, as one table entry each.

An entry reads an HF config dict and returns the ModelConfig fields that differ from Llama's defaults
(server.model.config.ModelConfig documents each field); the decoder reads only those fields, so a new
architecture is an entry here, its checkpoint names in model.layout, and a test.
"""
from __future__ import annotations

import math
from collections.abc import Callable


def _llama(c: dict) -> dict:
    bias = bool(c.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(c.get("mlp_bias", False))}


def _qwen2(c: dict) -> dict:
    return {"qkv_bias": True}


def _qwen3(c: dict) -> dict:
    bias = bool(c.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": "head"}


def _gemma(c: dict) -> dict:
    """Gemma 2 and 3: norms as x·(1 + w) around both attention and MLP, GeGLU, token embeddings × √hidden
    (inside the embedding table, so a soft prompt is not scaled), scores scaled by query_pre_attn_scalar."""
    return {"norm_offset": 1.0, "norm_fp32_product": True, "norm_layout": "sandwich", "activation": _activation(c, "gelu_pytorch_tanh"),
            "embed_scale": math.sqrt(c["hidden_size"]), "embed_scale_inputs": False,
            "attn_scale": c.get("query_pre_attn_scalar", 256) ** -0.5,
            "attn_softcap": c.get("attn_logit_softcapping"), "final_softcap": c.get("final_logit_softcapping"),
            **_llama(c)}


def _gemma3(c: dict) -> dict:
    if c.get("use_bidirectional_attention"):
        raise ValueError("gemma3_text with use_bidirectional_attention (an encoder) is not a decoder Quiver serves")
    return {**_gemma(c), "qk_norm": "head"}


def _phi3(c: dict) -> dict:
    return {"fused_checkpoint": True, "qkv_bias": False, "o_bias": False}


def _olmo2(c: dict) -> dict:
    return {"norm_layout": "post", "norm_fp32_product": True, "qk_norm": "proj", **_llama(c)}


def _granite(c: dict) -> dict:
    return {"embed_scale": float(c.get("embedding_multiplier", 1.0)),
            "residual_scale": float(c.get("residual_multiplier", 1.0)),
            "attn_scale": float(c.get("attention_multiplier", 1.0)),
            "logit_scale": 1.0 / float(c.get("logits_scaling", 1.0)), **_llama(c)}


def _smollm3(c: dict) -> dict:
    return {"no_rope_layers": tuple(i for i, rope in enumerate(c.get("no_rope_layers") or ()) if not rope),
            **_llama(c)}


ARCHS: dict[str, Callable[[dict], dict]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma,
    "gemma3_text": _gemma3, "phi3": _phi3, "olmo2": _olmo2, "granite": _granite, "smollm3": _smollm3,
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def _activation(c: dict, default: str) -> str:
    return c.get("hidden_activation") or c.get("hidden_act") or default


def layer_windows(c: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (keys a query sees: its own position and the window - 1 before it), None
    for full attention: from `layer_types` where the config has them, else the window on every layer (Mistral,
    Phi-3) unless use_sliding_window is false."""
    window = c.get("sliding_window")
    types = c.get("layer_types")
    if not window:
        return (None,) * num_layers
    if types is None:
        return (window if c.get("use_sliding_window", True) else None,) * num_layers
    if len(types) != num_layers:
        raise ValueError(f"layer_types lists {len(types)} layers, the model has {num_layers}")
    return tuple(window if t == "sliding_attention" else None for t in types)
