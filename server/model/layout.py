"""The one table of where each HF projection lives in Quiver's fused layout.

The decoder fuses q/k/v into one [q + 2kv, hidden] weight and gate/up into one [2·inter, hidden]
weight, so every step runs four matmuls per layer. Adapters name PEFT's module names; this maps
them to a fused group and a slice of it.
"""
from __future__ import annotations

from quiver.server.model.config import ModelConfig

# fused group -> the HF projections it holds, in order along its output
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
# HF projection -> (fused group, slice index)
GROUP_OF = {m: (g, i) for g, mods in GROUPS.items() for i, m in enumerate(mods)}
MODULES = tuple(GROUP_OF)


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h),
            "v_proj": (cfg.num_kv_heads * d, h), "o_proj": (h, cfg.num_heads * d),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def slice_bounds(cfg: ModelConfig, module: str) -> tuple[str, int, int]:
    """(fused group, first row, end row) of one projection's weight inside its fused weight."""
    group, index = GROUP_OF[module]
    shapes = module_shapes(cfg)
    start = sum(shapes[m][0] for m in GROUPS[group][:index])
    return group, start, start + shapes[module][0]
