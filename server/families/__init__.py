"""Adapter families: one module per family behind one protocol (base), and the three parts that manage
adapters: the catalog (names and folders), the loader (reads) and residency (tiers, pins, placement)."""
from __future__ import annotations

from quiver.server.families.bottleneck import BottleneckFamily
from quiver.server.families.lora import LoraFamily
from quiver.server.families.prompt import PromptFamily


def make_families(runner, blocks, max_loras: int, max_lora_rank: int, files: dict) -> list:
    """Every family, over the engine's model runner (model, ops, KV caches) and block manager; files: how
    adapter files are read (allow_pickle, max_bytes)."""
    r = runner
    return [PromptFamily(r.model_config, r.ops, blocks, r.kv_caches, r.max_model_len, r.dtype, r.device, files),
            BottleneckFamily(r.model_config, r.ops, r.dtype, r.device, files),
            LoraFamily(r.model, r.ops, max_loras, max_lora_rank, files)]
