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
# checkpoints that save a group already fused (Phi-3): the group -> its one module's name
FUSED_NAMES = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}


def checkpoint_groups(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Fused group -> the checkpoint modules it is read from, in order along its output."""
    if not cfg.fused_checkpoint:
        return GROUPS
    return {group: (FUSED_NAMES[group],) if group in FUSED_NAMES else modules for group, modules in GROUPS.items()}


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection the checkpoint saves, in PEFT's order: the modules a LoRA can target
    (Phi-3's qkv_proj and gate_up_proj in place of q/k/v and gate/up)."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    every = {"q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h),
             "v_proj": (cfg.num_kv_heads * d, h), "o_proj": (h, cfg.num_heads * d),
             "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
             "qkv_proj": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), "gate_up_proj": (2 * i, h)}
    return {m: every[m] for modules in checkpoint_groups(cfg).values() for m in modules}


def group_of(cfg: ModelConfig, module: str) -> tuple[str, int]:
    """(fused group, slice index) of one of the checkpoint's projections (module_shapes names them)."""
    for group, modules in checkpoint_groups(cfg).items():
        if module in modules:
            return group, modules.index(module)
    raise KeyError(f"{module!r} is not a projection this checkpoint saves ({', '.join(module_shapes(cfg))})")


def slice_bounds(cfg: ModelConfig, module: str) -> tuple[str, int, int]:
    """(fused group, first row, end row) of one projection's weight inside its fused weight."""
    shapes = module_shapes(cfg)
    group, index = group_of(cfg, module)
    start = sum(shapes[m][0] for m in checkpoint_groups(cfg)[group][:index])
    return group, start, start + shapes[module][0]
