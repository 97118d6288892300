"""The architecture facts Quiver needs, read straight from an HF `config.json`.

Parsed by hand (not through transformers' config classes) so that the serving path has
one small, explicit contract with the checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from quiver.server.model.archs import ACTIVATIONS, ARCHS, layer_windows

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
REFUSED = {  # model types people ask for that stay out, and why
    "mixtral": "a mixture-of-experts base", "qwen2_moe": "a mixture-of-experts base",
    "qwen3_moe": "a mixture-of-experts base", "olmoe": "a mixture-of-experts base",
    "granitemoe": "a mixture-of-experts base", "gemma3": "a vision-language model (serve its text model, "
    "model_type gemma3_text)", "llava": "a vision-language model", "mllama": "a vision-language model",
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: str | None = None  # "nf4"/"fp4": the checkpoint holds bitsandbytes 4-bit projections
    # ---- how the architecture departs from Llama's decoder (server.model.archs sets these) ----
    activation: str = "silu"  # the MLP's gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1 + w
    norm_fp32_product: bool = False  # RMSNorm multiplies by its weight in float32, then rounds (Gemma, OLMo 2)
    norm_layout: str = "pre"  # pre: norm before attention and MLP; sandwich: before and after (Gemma);
    # post: after only, on the outputs (OLMo 2)
    qk_norm: str | None = None  # RMSNorm of q and k before rope: per head (Qwen3, Gemma 3) or whole projection (OLMo 2)
    embed_scale: float = 1.0  # token embeddings × this (Gemma √hidden, Granite's embedding_multiplier)
    embed_scale_inputs: bool = True  # applied to the inputs incl. soft prompts (Granite); False: in the table (Gemma)
    residual_scale: float = 1.0  # each block's output × this before the residual add (Granite)
    attn_scale: float | None = None  # the scores' scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores → tanh(scores / c) · c before the mask (Gemma 2)
    final_softcap: float | None = None  # logits → tanh(logits / c) · c (Gemma 2)
    logit_scale: float = 1.0  # logits × this (Granite: 1 / logits_scaling)
    layer_windows: tuple[int | None, ...] = ()  # each layer's sliding window, None: full attention
    local_rope: dict | None = None  # sliding layers' own rope (Gemma 3: rope_type and rope_theta)
    no_rope_layers: tuple[int, ...] = ()  # layers without rope (SmolLM3)
    fused_checkpoint: bool = False  # q/k/v and gate/up saved fused as qkv_proj and gate_up_proj (Phi-3)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in ARCHS:
            why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
            raise ValueError(f"model_type {model_type!r}{why} is not supported (supported: {', '.join(ARCHS)})")
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ValueError(f"{model_type} with experts (a mixture-of-experts base) is not supported")
        arch = ARCHS[model_type](cfg)
        act = arch.get("activation", cfg.get("hidden_act", "silu"))
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        arch["activation"] = act
        heads = cfg["num_attention_heads"]
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters, per layer type where layers differ
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        local = params.pop("sliding_attention", None)
        rope = dict(params.pop("full_attention", None) or params)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if model_type == "phi3":  # as transformers' Phi3Config: its top-level keys win, "su"/"yarn" mean longrope
            rope["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings", 4096)
            rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
            if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):
                rope["rope_type"] = "longrope"
        rope["rope_type"] = _rope_type(rope)
        if rope["rope_type"] in ("llama3", "yarn", "longrope"):
            rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
        if local is not None:
            local = {**local, "rope_type": _rope_type(local)}
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        layers = cfg["num_hidden_layers"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=_quantization(cfg.get("quantization_config")),
            layer_windows=layer_windows(cfg, layers),
            local_rope=local,
            **arch,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def _quantization(qc: dict | None) -> str | None:
    """What a saved quantization_config means for us: bitsandbytes 4-bit is read, anything else refused."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "bitsandbytes" or not qc.get("load_in_4bit"):
        what = "8-bit bitsandbytes" if qc.get("load_in_8bit") else repr(method)
        raise ValueError(f"the checkpoint is quantized with {what}; only bitsandbytes 4-bit (NF4, FP4) is "
                         "served (or give an unquantized model and --quantization nf4)")
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type {kind!r} is not supported (nf4, fp4)")
    return kind


def _rope_type(rope: dict) -> str:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return kind
