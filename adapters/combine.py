"""Combine several LoRA adapters into one, as PEFT's `add_weighted_adapter` defines it.

Every method returns, per targeted (layer, module), one LoraModule whose b·a (plus DoRA's
(g - 1)·W, for "cat") is the combined weight delta, the weights and scales folded in:

- "cat" (exact): a' = [a_1; a_2; ...], b' = [w_1 b_1, w_2 b_2, ...], so b'a' = Σ w_i s_i B_i A_i.
  DoRA adapters keep their full delta: g' = 1 + Σ w_i (g_i - 1).
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": PEFT's task arithmetic on A and
  on B separately, each weighted by sqrt(|w_i s_i|) (the sign on A's side); ties and
  magnitude_prune keep the top `density` fraction of each tensor by magnitude, dare drops
  entries at random (seeded; same draws, in the same order, as PEFT's) and rescales by 1/density,
  ties and dare_ties keep only the entries that agree with the majority sign. These need every
  adapter at the same rank per module and plain LoRA/rsLoRA (no DoRA magnitude, no AdaLoRA E).

One adapter alone is always "cat" (PEFT turns any method into "linear" there: the same delta).
PEFT gives the combined adapter lora_alpha = r, so scale 1, except that it inherits use_rslora
from the first adapter and then scales by sqrt(r); here the scale is always 1.
"""
from __future__ import annotations

import math

import torch

from quiver.adapters.errors import AdapterError
from quiver.adapters.lora import MODULES, LoraAdapter, LoraModule

METHODS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
Key = tuple[int, str]


def combine(adapters: list[tuple[LoraAdapter, float]], method: str = "cat", density: float | None = None,
            majority_sign: str = "total", seed: int = 0) -> dict[Key, LoraModule]:
    if method not in METHODS:
        raise AdapterError(f"unknown combination {method!r} (choose from {', '.join(METHODS)})")
    if not adapters:
        raise AdapterError("nothing to combine")
    if len(adapters) == 1:
        method = "cat"
    if method != "cat":
        _check_task_arithmetic(adapters, method, density, majority_sign)
    # PEFT's order (layer by layer, projections in model order) so that dare draws the same masks
    keys = sorted({k for a, _ in adapters for k in a.modules}, key=lambda k: (k[0], MODULES.index(k[1])))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        present = [(a.modules[key], w) for a, w in adapters if key in a.modules]
        out[key] = _cat(present) if method == "cat" else _task_arithmetic(present, method, density, majority_sign,
                                                                          gen)
    return out


def _check_task_arithmetic(adapters, method, density, majority_sign) -> None:
    for a, _ in adapters:
        if a.uses_dora or a.spec.peft_type == "ADALORA":
            raise AdapterError(f"{a.spec.path}: {method} combines lora_A and lora_B entry by entry, which PEFT "
                               "defines for plain LoRA only (not DoRA or AdaLoRA); use --combination cat")
    keys = {k for a, _ in adapters for k in a.modules}
    per_module = [{a.modules[k].a.shape[0] for a, _ in adapters if k in a.modules} for k in keys]
    if len({a.rank for a, _ in adapters}) > 1 or any(len(r) > 1 for r in per_module):
        raise AdapterError(f"{method} needs every adapter at the same rank (use --combination cat)")
    if method != "linear" and (density is None or not 0 < density <= 1):
        raise AdapterError(f"{method} needs --density in (0, 1], the fraction of entries kept")
    if majority_sign not in ("total", "frequency"):
        raise AdapterError(f"majority sign method must be total or frequency, not {majority_sign!r}")


def _cat(present: list[tuple[LoraModule, float]]) -> LoraModule:
    a = torch.cat([m.a for m, _ in present])
    b = torch.cat([w * m.b for m, w in present], dim=1)
    dora = None
    if any(m.dora_scale is not None for m, _ in present):
        dora = 1 + sum(w * (m.dora_scale - 1) for m, w in present if m.dora_scale is not None)
    return LoraModule(a=a.contiguous(), b=b.contiguous(), dora_scale=dora)


def _task_arithmetic(present, method, density, majority_sign, gen) -> LoraModule:
    ws = [w * m.scale for m, w in present]  # PEFT: weight × the adapter's own scaling
    w_a = torch.tensor([math.copysign(math.sqrt(abs(v)), v) for v in ws])
    w_b = torch.tensor([math.sqrt(abs(v)) for v in ws])
    a = _mix([m.a for m, _ in present], w_a, method, density, majority_sign, gen)
    b = _mix([m.b / m.scale for m, _ in present], w_b, method, density, majority_sign, gen)
    return LoraModule(a=a.contiguous(), b=b.contiguous())


def _mix(tensors, weights, method, density, majority_sign, gen) -> torch.Tensor:
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [_prune_random(t, density, gen) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if not method.endswith("ties"):
        return weighted.sum(0)
    sign = stacked.sign()
    votes = stacked.sum(0) if majority_sign == "total" else sign.sum(0)
    agrees = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density
