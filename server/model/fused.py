"""Every decoder layer of a few-row step in one C++ call (kernels.cpu_kernels decode_layers) on the CPU.

At batch 1 a bfloat16 step of SmolLM2 streams 269 MB of weights in about 8 ms; the dozen small ops a layer
adds around its four projections cost Python and dispatcher time of their own, a few microseconds each, 30
layers over, and each projection a fork and a join of torch's threads. Where the model and the step allow, the
same maths runs in one C++ call instead, its threads together from the first layer to the last (meeting at a
barrier after each phase), the eager path's result bit for bit, LoRA rows included.

The model must be a plain pre-norm decoder (Llama's layout: no q/k norms, sandwich norms, sliding windows,
soft-caps, residual scaling, rope-free or local-rope layers) in bfloat16 with every projection readable by
the few-row kernel; the step must have at most FEW_ROWS tokens in one in-order attention group of at most
FEW_QUERIES queries a row, and no adapter hooks but LoRA's without DoRA (LoraStep.fused_lora).
"""
from __future__ import annotations

import torch

from quiver.kernels.ops import ACT_KINDS, FEW_QUERIES, FEW_ROWS, DecodePlan, fused_decode_layers, serves
from quiver.server.model.layout import GROUPS


class FusedLayers:
    """The model's per-layer tensors as decode_layers takes them, gathered once at load."""

    def __init__(self, model):
        self.model = model
        self.norms = [n for layer in model.layers for n in (layer.norms["attn_in"], layer.norms["mlp_in"])]
        self.weights = [getattr(layer, g).blocks for layer in model.layers for g in GROUPS]
        self.widths = [getattr(model.layers[0], g).shape[0] for g in GROUPS]
        self.biases = [getattr(layer, g + "_bias") for layer in model.layers for g in GROUPS]
        # (the runner's kv_caches list, a LoRA family's fused buffers or None) -> (both, the kernel's plan of them)
        self._plans: dict[tuple[int, int], tuple[list, tuple | None, DecodePlan]] = {}

    def _plan(self, kv_caches: list, lora_buffers: tuple | None) -> DecodePlan:
        """The kernel's plan of the model with these caches and LoRA slot buffers, made once (each is made once by
        its owner: the runner, the LoRA family)."""
        key = (id(kv_caches), id(lora_buffers))
        held = self._plans.get(key)
        if held is None or held[0] is not kv_caches or held[1] is not lora_buffers:
            m, c = self.model, self.model.cfg
            a, b, slices, offsets, rank = lora_buffers or ([], [], [], [], 0)
            plan = DecodePlan(self.norms, self.weights, self.widths, self.biases, [k for k, _ in kv_caches],
                              [v for _, v in kv_caches], a, b, slices, offsets, rank, c.rms_norm_eps, c.norm_offset,
                              c.norm_fp32_product, c.num_heads, c.num_kv_heads, c.head_dim, ACT_KINDS[c.activation],
                              m.scale, m.norm)
            self._plans[key] = held = (kv_caches, lora_buffers, plan)
        return held[2]

    @staticmethod
    def of(model) -> FusedLayers | None:
        """The fused path for this model, or None where its layout or weights do not allow one."""
        c = model.cfg
        if (model.dtype != torch.bfloat16 or c.norm_layout != "pre" or c.qk_norm is not None
                or c.local_rope is not None or model.window_sizes or c.attn_softcap is not None
                or c.residual_scale != 1.0 or c.activation not in ACT_KINDS
                or any(r is None for r in model.layer_rope) or not serves(model.norm)):
            return None
        if any(getattr(getattr(layer, g), "blocks", None) is None for layer in model.layers for g in GROUPS):
            return None
        return FusedLayers(model)

    def __call__(self, x, ropes, step, kv_caches) -> torch.Tensor | None:
        """x [T, hidden] after every layer and the final norm, or None when this step takes the op-by-op path."""
        groups = step.attention
        if x.shape[0] > FEW_ROWS or len(groups) != 1 or not groups[0].slots.in_order \
                or groups[0].slots.max_q > FEW_QUERIES or step.hooks.residual:
            return None
        lora = [hook.fused_lora() if hasattr(hook, "fused_lora") else None for hook in step.hooks.linear]
        if len(lora) > 1 or None in lora:
            return None
        buffers, token_slots = lora[0] if lora else (None, None)
        group = groups[0]
        cos, sin = ropes[0]
        return fused_decode_layers(self._plan(kv_caches, buffers), x, cos, sin, step.slot_mapping, group.block_tables,
                                   group.allowed, token_slots)
