"""The prompt-learning family: soft prompts (prompt tuning, P-tuning) and prefix KV (prefix
tuning, P-tuning v2), as PEFT saves them.

A soft prompt is n virtual embeddings at the head of each request: its n placeholder tokens take
them in the step's embedding hook. A prefix is written once, at registration, into KV-cache
blocks the adapter holds; every request of the adapter puts those blocks at the head of its block
table (reference-counted, read-only) and its own tokens start at the next block boundary.
"""
from __future__ import annotations

import torch

from quiver.adapters.errors import AdapterError
from quiver.adapters.prompt import PromptAdapter, load_prompt_adapter
from quiver.kernels.ops import Ops
from quiver.server.families.base import Binding


class PromptFamily:
    kinds = ("soft_prompt", "prefix")
    num_slots = 0

    def __init__(self, cfg, ops: Ops, blocks, kv_caches, max_model_len: int, dtype: torch.dtype, device,
                 files: dict):
        self.cfg, self.ops, self.blocks, self.kv_caches = cfg, ops, blocks, kv_caches
        self.max_model_len, self.dtype, self.device, self.files = max_model_len, dtype, device, files
        self.order = 0
        self.adapters: dict[str, PromptAdapter] = {}
        self.prefix_blocks: dict[str, tuple[int, ...]] = {}
        self.soft_prompts: dict[str, torch.Tensor] = {}  # on the device

    def read(self, name: str, path: str) -> PromptAdapter:
        c = self.cfg
        return load_prompt_adapter(name, path, c.num_layers, c.hidden_size, c.num_kv_heads, c.head_dim, **self.files)

    def stage(self, adapter: PromptAdapter) -> PromptAdapter:
        return adapter  # put on the device at registration

    def register(self, adapter: PromptAdapter) -> None:
        n = adapter.num_virtual
        if n >= self.max_model_len:
            raise AdapterError(f"{adapter.spec.path}: {n} virtual tokens leave no room in the context length "
                               f"of {self.max_model_len}")
        if adapter.prefix_kv is not None:
            bs, need = self.blocks.block_size, -(-n // self.blocks.block_size)
            if need > self.blocks.num_free:
                raise AdapterError(f"{adapter.spec.path}: its {n}-token prefix needs {need} KV blocks, "
                                   f"{self.blocks.num_free} are free")
            blocks = self.blocks.allocate_shared(need)
            slots = torch.tensor([blocks[i // bs] * bs + i % bs for i in range(n)], device=self.device)
            kv = adapter.prefix_kv.to(self.device, self.dtype)
            for layer, (k_cache, v_cache) in enumerate(self.kv_caches):
                self.ops.zero_blocks(k_cache, v_cache, torch.tensor(blocks, device=self.device))  # the tail stays 0
                self.ops.write_kv(k_cache, v_cache, kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1), slots)
            self.prefix_blocks[adapter.name] = tuple(blocks)
        else:
            self.soft_prompts[adapter.name] = adapter.soft_prompt.to(self.device)
        self.adapters[adapter.name] = adapter

    def unregister(self, name: str) -> None:
        del self.adapters[name]
        self.soft_prompts.pop(name, None)
        self.blocks.release_shared(self.prefix_blocks.pop(name, ()))

    def names(self) -> list[str]:
        return list(self.adapters)

    def virtual_tokens(self, name: str) -> int:
        return self.adapters[name].num_virtual

    def bind(self, name: str) -> Binding:
        n = self.adapters[name].num_virtual
        if name in self.soft_prompts:
            return Binding(name, self, num_virtual=n, soft_prompt=self.soft_prompts[name])
        blocks = self.prefix_blocks[name]
        return Binding(name, self, prefix_len=n, kv_offset=len(blocks) * self.blocks.block_size, shared_blocks=blocks)

    def place(self, bindings: list[Binding]) -> None:
        pass  # nothing per step: prefixes live in KV blocks, soft prompts ride on the binding

    def info(self, name: str) -> dict:
        a = self.adapters[name]
        return {"name": name, "family": a.family, "peft_type": a.spec.peft_type, "virtual_tokens": a.num_virtual,
                "bytes": a.nbytes}

    def step_hook(self, step):
        """The soft-prompt vectors of every chunk that covers placeholder tokens."""
        index, embeds = [], []
        for (seq, n), first in zip(step.rows, step.layout.offsets.tolist()):
            b, start = seq.binding, seq.num_computed
            if b is not None and b.family is self and start < b.num_virtual:
                end = min(start + n, b.num_virtual)
                index.extend(range(first, first + end - start))
                embeds.append(b.soft_prompt[start:end])
        if not index:
            return None
        return SoftPromptStep(torch.tensor(index, dtype=torch.long), torch.cat(embeds))


class SoftPromptStep:
    UPLOAD = ("index",)

    def __init__(self, index: torch.Tensor, embeds: torch.Tensor):
        self.index, self.embeds = index, embeds  # [V] token indices, [V, hidden] on the device

    def embed(self, x: torch.Tensor) -> None:
        x.index_copy_(0, self.index, self.embeds.to(x.dtype))
