"""Bottleneck adapters as AdapterHub's `adapters` library saves them (`seq_bn`, Pfeiffer 2020;
`double_seq_bn`, Houlsby 2019), for Llama-family models.

Files read: `adapter_config.json` (AdapterHub's layout: the adapter's settings under "config")
and `adapter.safetensors` with, per decoder layer i and location (attention_adapters after
self-attention, output_adapters after the MLP):
  ...layers.{i}.{attention_adapters|output_adapters}.adapters.{name}.adapter_down.0.{weight,bias}
  ...layers.{i}.{attention_adapters|output_adapters}.adapters.{name}.adapter_up.{weight,bias}

With o the sub-block's output and r its residual input, AdapterHub computes for these settings
  h = r + o + s * up(act(down(z))),   z = r + o if original_ln_before else o.
The scaling s is folded into up's weight and bias at load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quiver.adapters.config_file import finite_number, read_config
from quiver.adapters.errors import AdapterError
from quiver.adapters.weights import read_weights

WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
LOCATIONS = {"attention_adapters": "attn", "output_adapters": "mlp"}
ACTIVATIONS = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "leakyrelu")
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
                  r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
# settings this implementation follows, with the values it supports
_REQUIRED = {"residual_before_ln": (True,), "original_ln_after": (True,), "ln_before": (False,), "ln_after": (False,),
             "use_gating": (False,), "is_parallel": (False,), "phm_layer": (False,), "inv_adapter": (None,)}


@dataclass
class BottleneckModule:
    down: torch.Tensor  # [m, hidden]
    down_bias: torch.Tensor  # [m]
    up: torch.Tensor  # [hidden, m], scaling folded in
    up_bias: torch.Tensor  # [hidden], scaling folded in


@dataclass
class BottleneckAdapter:
    name: str
    path: Path
    activation: str
    input_is_sum: bool  # original_ln_before: the adapter reads r + o, not o
    modules: dict[tuple[int, str], BottleneckModule] = field(default_factory=dict)

    family = "bottleneck"

    @property
    def width(self) -> int:
        return max(m.down.shape[0] for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values()
                   for t in (m.down, m.down_bias, m.up, m.up_bias))


def load_bottleneck(name: str, path: str | Path, num_layers: int, hidden: int, model_type: str,
                    allow_pickle: bool = False, max_bytes: int | None = None) -> BottleneckAdapter:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    meta = read_config(cfg_file)
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not an AdapterHub adapter config (no \"config\" object)")
    if cfg.get("architecture", "bottleneck") != "bottleneck":
        raise AdapterError(f"{cfg_file}: architecture {cfg.get('architecture')!r} is not supported (only bottleneck)")
    if meta.get("model_type") not in (None, model_type):
        raise AdapterError(f"{cfg_file}: made for model_type {meta.get('model_type')!r}, the base is {model_type!r}")
    if meta.get("hidden_size") not in (None, hidden):
        raise AdapterError(f"{cfg_file}: hidden_size {meta.get('hidden_size')} does not match the base ({hidden})")
    for option, allowed in _REQUIRED.items():
        if cfg.get(option, allowed[0]) not in allowed:
            raise AdapterError(f"{cfg_file}: option {option}={cfg.get(option)!r} is not supported by Quiver")
    act = str(cfg.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise AdapterError(f"{cfg_file}: non_linearity {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    scaling = cfg.get("scaling", 1.0)
    if isinstance(scaling, str) or isinstance(scaling, bool):
        raise AdapterError(f"{cfg_file}: option scaling={scaling!r} is not supported (a number only)")
    scaling = finite_number(scaling, "scaling", cfg_file)
    tensors, file = read_weights(path, WEIGHTS_FILE, PICKLE_FILE, allow_pickle, max_bytes)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a bottleneck adapter weight")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise AdapterError(f"{file}: tensor {key!r} targets layer {layer}, the base model has {num_layers}")
        parts.setdefault((layer, LOCATIONS[m.group(2)]), {})[f"{m.group(4)}.{m.group(5)}"] = tensor.float()
    if not parts:
        raise AdapterError(f"{file}: holds no bottleneck weights")
    adapter = BottleneckAdapter(name, path, act, bool(cfg.get("original_ln_before", True)))
    for (layer, loc), p in sorted(parts.items()):
        where = f"{file}: layers.{layer}.{loc}"
        try:
            dw, db, uw, ub = (p["adapter_down.0.weight"], p["adapter_down.0.bias"], p["adapter_up.weight"],
                              p["adapter_up.bias"])
        except KeyError as exc:
            raise AdapterError(f"{where}: missing {exc}") from exc
        m_dim = dw.shape[0]
        if dw.shape != (m_dim, hidden) or db.shape != (m_dim,) or uw.shape != (hidden, m_dim) or ub.shape != (hidden,):
            raise AdapterError(f"{where}: shapes down {tuple(dw.shape)}, up {tuple(uw.shape)} do not match "
                               f"hidden size {hidden}")
        adapter.modules[(layer, loc)] = BottleneckModule(dw.contiguous(), db, (uw * scaling).contiguous(),
                                                         ub * scaling)
    return adapter
