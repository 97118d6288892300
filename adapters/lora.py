"""Load a PEFT LoRA / rsLoRA / DoRA / AdaLoRA checkpoint into per-module (A, s·B) pairs.

Everything that depends only on the adapter is done here, once: the scale s is folded into
B; AdaLoRA's E is folded into A; DoRA's magnitude becomes a per-output-column factor g
(so that serving computes y = Wx + b + (g - 1)·Wx + B'(Ax) with B' = g·s·B).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from quiver.adapters.errors import AdapterError
from quiver.adapters.spec import AdapterSpec, read_spec
from quiver.adapters.weights import read_weights

# every projection a LoRA may target, in PEFT's order; Phi-3 saves q/k/v and gate/up fused
MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
ATTENTION = MODULES[:5]
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                  r"(lora_A|lora_B|lora_E|lora_magnitude_vector)(?:\.weight)?$")
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scale (and DoRA's g) folded in
    dora_scale: torch.Tensor | None = None  # g = m / ||W + sBA||_row, [out]
    scale: float = 1.0  # the s folded into b, kept for combinations that weigh raw B (adapters/combine.py)


@dataclass
class LoraAdapter:
    name: str
    spec: AdapterSpec
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)

    family = "lora"

    @property
    def rank(self) -> int:
        return max(m.a.shape[0] for m in self.modules.values())

    @property
    def targets(self) -> list[str]:
        return sorted({name for _, name in self.modules}, key=MODULES.index)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values()
                   for t in (m.a, m.b, m.dora_scale) if t is not None)

    @property
    def uses_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())


BaseWeight = Callable[[int, str], torch.Tensor]  # (layer, module) -> W [out, in] of the base model (see dora_factor)


def load_lora(name: str, path: str | Path, num_layers: int, shapes: dict[str, tuple[int, int]],
              base_weight: BaseWeight, max_rank: int, allow_pickle: bool = False,
              max_bytes: int | None = None) -> LoraAdapter:
    """shapes: module -> (out, in) of every projection the base model's checkpoint saves (a LoRA on any other,
    such as q_proj over Phi-3's fused qkv_proj, is refused: PEFT could not have put it there)."""
    spec = read_spec(path)
    raw, file = read_weights(spec.path, WEIGHTS_FILE, PICKLE_FILE, allow_pickle, max_bytes)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA weight of a decoder-layer projection "
                               "(LoRA on embeddings, lm_head or other modules is not supported)")
        layer, module, kind = int(m.group(1)), m.group(3), m.group(4)
        if module not in shapes:
            raise AdapterError(f"{file}: target module {module!r} does not exist in this base model "
                               f"(its modules: {', '.join(shapes)})")
        if layer >= num_layers:
            raise AdapterError(f"{file}: tensor {key!r} targets layer {layer}, the base model has {num_layers}")
        parts.setdefault((layer, module), {})[kind] = tensor
    if not parts:
        raise AdapterError(f"{file}: holds no LoRA weights")
    adapter = LoraAdapter(name=name, spec=spec)
    for (layer, module), p in sorted(parts.items()):
        mod = _module(spec, file, layer, module, p, shapes[module], base_weight, max_rank)
        if mod is not None:  # AdaLoRA may prune a module to rank 0
            adapter.modules[(layer, module)] = mod
    if not adapter.modules:
        raise AdapterError(f"{file}: every module has rank 0")
    return adapter


def _module(spec: AdapterSpec, file: Path, layer: int, module: str, p: dict, shape: tuple[int, int],
            base_weight: BaseWeight, max_rank: int) -> LoraModule | None:
    where = f"{file}: layers.{layer}.{module}"
    if "lora_A" not in p or "lora_B" not in p:
        raise AdapterError(f"{where}: needs both lora_A and lora_B")
    a, b = p["lora_A"].float(), p["lora_B"].float()
    out_f, in_f = shape
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
        raise AdapterError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the base "
                           f"module [{out_f}, {in_f}] (expected A [r, {in_f}], B [{out_f}, r])")
    if r > max_rank:
        raise AdapterError(f"{where}: rank {r} exceeds --max-lora-rank {max_rank}")
    key = f"model.layers.{layer}.{'self_attn' if module in ATTENTION else 'mlp'}.{module}"
    if not spec.targets(key):  # PEFT would not put the adapter there, and would ignore these tensors
        raise AdapterError(f"{where}: the checkpoint has weights for {key}, which adapter_config.json's "
                           "target_modules (with exclude_modules, layers_to_transform) does not target")
    if spec.peft_type == "LORA" and r != spec.rank_for(key):  # PEFT would refuse the shapes
        raise AdapterError(f"{where}: lora_A has rank {r}, adapter_config.json gives this module rank "
                           f"{spec.rank_for(key)} (r or rank_pattern)")
    alpha = spec.alpha_for(key)
    if spec.peft_type == "ADALORA":
        e = p.get("lora_E")
        if e is None or e.shape != (r, 1):
            raise AdapterError(f"{where}: AdaLoRA needs lora_E of shape [{r}, 1]")
        a = a * e.float()
        # PEFT keeps ranknum at init_r when it prunes by rank_pattern; scaling is lora_alpha
        scale = (alpha if alpha > 0 else float(r)) / (spec.init_r + 1e-5)
    else:
        scale = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
    if r == 0:
        return None  # AdaLoRA pruned the module away (a LoRA rank-0 module fails the rank check above)
    if not math.isfinite(scale):
        raise AdapterError(f"{where}: the scale alpha/r = {scale!r} is not finite")
    b = b * scale
    dora = None
    if spec.use_dora:
        m = p.get("lora_magnitude_vector")
        if m is None or m.shape != (out_f,):
            raise AdapterError(f"{where}: DoRA needs lora_magnitude_vector of shape [{out_f}]")
        dora = dora_factor(base_weight(layer, module), a, b, m)
        if not torch.isfinite(dora).all():
            raise AdapterError(f"{where}: DoRA's magnitude / ||W + sBA|| is not finite (a zero column norm)")
        b = b * dora[:, None]
    if not torch.isfinite(b).all():
        raise AdapterError(f"{where}: lora_B scaled by alpha/r overflows")
    return LoraModule(a=a.contiguous(), b=b.contiguous(), dora_scale=dora, scale=scale)


NORM_CHUNK_ELEMENTS = 1 << 20  # W + sBA rows formed at once for DoRA's norms: 4 MiB of fp32


def dora_factor(w, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor,
                chunk_elements: int = NORM_CHUNK_ELEMENTS) -> torch.Tensor:
    """DoRA's g = m / ||W + B A|| per output row (b already scaled): w [out, in] on the serving device
    (a tensor, or anything whose w.narrow(0, r0, n) gives those rows, e.g. a 4-bit base dequantized on demand),
    a [r, in], b [out, r], m [out] where the adapter lives.

    The norm is taken where W lives (W may be large and on a GPU), a block of rows at a time in fp32, so
    that the extra memory is about chunk_elements floats whatever the model (a full fp32 [out, in] is
    235 MB for Llama-8B's down_proj, beside a KV cache sized without it); g comes back to the adapter's
    device."""
    out_f, in_f = w.shape
    rows = max(1, chunk_elements // in_f)
    a_w, b_w = a.to(w.device), b.to(w.device)  # [r, in] and [out, r]: small
    norm = torch.empty(out_f, dtype=torch.float32, device=w.device)
    for r0 in range(0, out_f, rows):
        n = min(rows, out_f - r0)
        block = b_w.narrow(0, r0, n) @ a_w  # [n, in] fp32, W's rows added in place (W itself is never written)
        block += w.narrow(0, r0, n)
        torch.linalg.vector_norm(block, dim=1, out=norm.narrow(0, r0, n))
    return m.float() / norm.to(b.device)
