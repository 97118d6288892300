"""Prompt-learning checkpoints from PEFT: soft prompts (prompt tuning, P-tuning) and prefix
key/values (prefix tuning, P-tuning v2).

PEFT's `save_pretrained` stores one tensor, `prompt_embeddings`: the prompt encoder's output
(P-tuning's MLP/LSTM and prefix tuning's projection already applied, since none of them
depends on the input). Loading is therefore a reshape and a check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quiver.adapters.errors import AdapterError
from quiver.adapters.lora import PICKLE_FILE, WEIGHTS_FILE
from quiver.adapters.config_file import read_config
from quiver.adapters.spec import PROMPT_TYPES, AdapterSpec, read_spec
from quiver.adapters.weights import read_weights


@dataclass
class PromptAdapter:
    name: str
    spec: AdapterSpec
    num_virtual: int
    soft_prompt: torch.Tensor | None = None  # [n, hidden] (prompt tuning, P-tuning)
    prefix_kv: torch.Tensor | None = None  # [layers, 2, kv_heads, n, head_dim] (prefix tuning, P-tuning v2)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def nbytes(self) -> int:
        t = self.soft_prompt if self.soft_prompt is not None else self.prefix_kv
        return t.numel() * t.element_size()


def declared_virtual_tokens(folder: str | Path) -> int:
    """The virtual tokens an adapter folder's config declares (0 for other families, or a config that
    cannot be read: its read fails the request later), without reading its weights."""
    try:
        cfg = read_config(Path(folder) / "adapter_config.json")
        n = int(cfg.get("num_virtual_tokens") or 0) if cfg.get("peft_type") in PROMPT_TYPES else 0
    except (AdapterError, OSError, TypeError, ValueError):
        return 0
    return max(n, 0)


def load_prompt_adapter(name: str, path: str | Path, num_layers: int, hidden: int, kv_heads: int,
                        head_dim: int, allow_pickle: bool = False, max_bytes: int | None = None) -> PromptAdapter:
    spec = read_spec(path)
    cfg = spec.config
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"{spec.config_file}: num_transformer_submodules="
                           f"{cfg.get('num_transformer_submodules')} (encoder-decoder) is not supported")
    tensors, file = read_weights(spec.path, WEIGHTS_FILE, PICKLE_FILE, allow_pickle, max_bytes)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{file}: expected exactly one tensor 'prompt_embeddings' as PEFT saves it, "
                           f"found {sorted(tensors)[:5]}")
    emb = tensors["prompt_embeddings"].float()
    n = int(cfg.get("num_virtual_tokens") or 0)
    if n < 1 or emb.dim() != 2 or emb.shape[0] != n:
        raise AdapterError(f"{file}: prompt_embeddings {tuple(emb.shape)} does not match "
                           f"num_virtual_tokens={cfg.get('num_virtual_tokens')}")
    if spec.family == "soft_prompt":
        if emb.shape[1] != hidden:
            raise AdapterError(f"{file}: prompt_embeddings width {emb.shape[1]} does not match the base "
                               f"model's hidden size {hidden}")
        return PromptAdapter(name, spec, n, soft_prompt=emb.contiguous())
    width = num_layers * 2 * kv_heads * head_dim
    if cfg.get("num_layers") != num_layers or emb.shape[1] != width:
        raise AdapterError(f"{file}: prefix of {cfg.get('num_layers')} layers x width {emb.shape[1]} does not "
                           f"match the base model ({num_layers} layers x 2 x {kv_heads} KV heads x {head_dim})")
    # PEFT: view(n, layers*2, heads, head_dim), layer l's keys at 2l and values at 2l+1
    kv = emb.view(n, num_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
    return PromptAdapter(name, spec, n, prefix_kv=kv)
