"""A reference for AdapterHub bottleneck adapters on a transformers Llama model, written from
the library's dataflow (pre_forward / forward / post_forward of its `Adapter`; Llama passes no
layer norm), and a writer for checkpoints in the library's format. The library itself is not a test
dependency: its releases pin transformers 4.x (adapters 1.3.0: transformers ~= 4.57.6), older than Quiver's."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "tanh": torch.tanh, "leakyrelu": F.leaky_relu}
SEQ_BN = dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
              adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=False,
              output_adapter=True, non_linearity="relu", reduction_factor=16, scaling=1.0, use_gating=False,
              is_parallel=False, phm_layer=False, inv_adapter=None, leave_out=[], architecture="bottleneck")
DOUBLE_SEQ_BN = dict(SEQ_BN, original_ln_before=False, mh_adapter=True, non_linearity="swish")


class RefAdapter(torch.nn.Module):
    def __init__(self, hidden: int, width: int, cfg: dict):
        super().__init__()
        self.down = torch.nn.Linear(hidden, width)
        self.up = torch.nn.Linear(width, hidden)
        self.cfg = cfg

    def forward(self, o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """o: the sub-block's output, r: its residual input; returns the layer's new hidden state."""
        cfg = self.cfg
        residual = o if cfg["residual_before_ln"] is True else None  # pre_forward
        hidden = o + r if cfg["original_ln_before"] else o
        if not cfg["residual_before_ln"]:
            residual = hidden
        up = self.up(ACT[cfg["non_linearity"]](self.down(hidden))) * cfg["scaling"]  # forward
        out = up + residual
        if cfg["original_ln_after"]:  # post_forward
            out = out + r
        return out


def make_bottleneck(model, path: Path, name: str, cfg: dict, seed: int) -> dict[tuple[int, str], RefAdapter]:
    """Random adapter modules for every layer and location the config asks for; saved to `path`."""
    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    width = max(1, int(hidden // cfg["reduction_factor"]))
    mods, tensors = {}, {}
    locations = [loc for loc, on in (("attention_adapters", cfg["mh_adapter"]), ("output_adapters", cfg["output_adapter"]))
                 if on]
    for i in range(model.config.num_hidden_layers):
        if i in cfg["leave_out"]:
            continue
        for loc in locations:
            mod = RefAdapter(hidden, width, cfg)
            with torch.no_grad():
                for p in mod.parameters():
                    p.copy_(torch.randn_like(p) * 0.2)
            mods[(i, loc)] = mod
            prefix = f"model.layers.{i}.{loc}.adapters.{name}"
            tensors.update({f"{prefix}.adapter_down.0.weight": mod.down.weight.detach().clone(),
                            f"{prefix}.adapter_down.0.bias": mod.down.bias.detach().clone(),
                            f"{prefix}.adapter_up.weight": mod.up.weight.detach().clone(),
                            f"{prefix}.adapter_up.bias": mod.up.bias.detach().clone()})
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "config": cfg, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_name": "tiny",
        "model_type": model.config.model_type, "name": name, "version": "adapters.1.2.0"}))
    save_file(tensors, str(path / "adapter.safetensors"))
    return mods


def reference_logits(model, mods: dict[tuple[int, str], RefAdapter], ids: list[int]) -> torch.Tensor:
    """transformers' Llama forward with the adapters hooked in where the library puts them."""
    stash, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: stash.__setitem__((i, "r1"), kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: stash.__setitem__((i, "r2"), args[0])))
        if (i, "attention_adapters") in mods:
            def attn_hook(m, args, out, i=i):
                r = stash[(i, "r1")]
                return (mods[(i, "attention_adapters")](out[0], r) - r, *out[1:])
            handles.append(layer.self_attn.register_forward_hook(attn_hook))
        if (i, "output_adapters") in mods:
            def mlp_hook(m, args, out, i=i):
                r = stash[(i, "r2")]
                return mods[(i, "output_adapters")](out, r) - r
            handles.append(layer.mlp.register_forward_hook(mlp_hook))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
