"""The engine's adapter registry: reading, registering, tiering and unloading adapters of every
family. LLMEngine inherits it; the state it uses (loras, prompt_adapters, prefix_blocks,
bottlenecks, known, requests_served) is created in LLMEngine.__init__."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapters.bottleneck import load_bottleneck
from adapters.errors import AdapterError
from adapters.lora import load_lora
from adapters.prompt import PromptAdapter, load_prompt_adapter
from adapters.spec import detect_family
from kernels import ref

from .lora_slots import module_shapes

log = logging.getLogger(__name__)


class UnknownAdapter(LookupError):
    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} does not exist")
        self.name = name


class AdapterExists(ValueError):
    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is already loaded")


class AdapterInUse(RuntimeError):
    def __init__(self, name: str, users: int):
        super().__init__(f"adapter {name!r} is in use by {users} request(s); unload it when they have finished")


class AdapterRegistryMixin:
    def load_adapter(self, name: str, path: str) -> None:
        """Read, check and register an adapter of any supported family; on any error nothing changes."""
        self.register_adapter(self.read_adapter(name, path))

    def read_adapter(self, name: str, path: str):
        """Parse and check an adapter folder into host memory. Touches no engine state, so it may
        run on any thread while the engine keeps stepping."""
        mc, c = self.runner.model_config, self.config
        files = dict(allow_pickle=c.allow_pickle, max_bytes=c.max_adapter_mb * 2**20)
        family = detect_family(path)
        if family == "bottleneck":
            return load_bottleneck(name, path, mc.num_layers, mc.hidden_size, mc.model_type, **files)
        if family != "lora":
            return load_prompt_adapter(name, path, mc.num_layers, mc.hidden_size, mc.num_kv_heads, mc.head_dim,
                                       **files)
        if self.loras is None:
            raise AdapterError(f"{path}: LoRA serving is off (--max-loras 0)")
        return load_lora(name, path, mc.num_layers, module_shapes(mc), self.runner.base_weight, c.max_lora_rank,
                         **files)

    def register_adapter(self, adapter, keep: frozenset[str] = frozenset()) -> None:
        """Make a read adapter usable (engine thread, between steps). Beyond --max-cpu-loras, the least
        recently used LoRA adapter that no request uses (nor any in `keep`) goes back to disk."""
        if adapter.name in self.adapter_names():
            raise AdapterExists(adapter.name)
        path = adapter.path if adapter.family == "bottleneck" else adapter.spec.path
        self.known[adapter.name] = str(path)
        if isinstance(adapter, PromptAdapter):
            self._register_prompt(adapter)
        elif adapter.family == "bottleneck":
            self.runner.bottleneck_slots.register(adapter)
            self.bottlenecks[adapter.name] = adapter
        else:
            self.loras.register(adapter)
            self._trim_cpu_tier(keep | {adapter.name})

    def _trim_cpu_tier(self, keep: set[str]) -> None:
        limit = self.config.max_cpu_loras
        if limit is None:
            return
        in_use = {seq.adapter for seq in self.seqs.values()} | keep
        while len(self.loras.adapters) > limit:
            victims = [n for n in self.loras.lru_order() if n not in in_use]
            if not victims:
                return  # everything is in use: over the limit until requests finish
            self.loras.unregister(victims[0])
            self.cpu_evictions += 1

    def is_resident(self, name: str) -> bool:
        return name in self.adapter_names()

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter and free its memory; refused (AdapterInUse) while a request uses it."""
        if name not in self.adapter_names():
            if self.known.pop(name, None) is not None:  # known but on disk: nothing else to free
                return
            raise UnknownAdapter(name)
        users = sum(1 for seq in self.seqs.values() if seq.adapter == name)
        if users:
            raise AdapterInUse(name, users)
        if name in self.bottlenecks:
            self.runner.bottleneck_slots.unregister(name)
            del self.bottlenecks[name]
        elif name in self.prompt_adapters:
            del self.prompt_adapters[name]
            self.blocks.release(self.prefix_blocks.pop(name, ()))
        else:
            self.loras.unregister(name)
        self.requests_served.pop(name, None)
        self.known.pop(name, None)

    def adapter_info(self, name: str) -> dict:
        if not self.is_resident(name):
            return {"name": name, "path": self.known[name], "tier": "disk",
                    "requests_served": self.requests_served.get(name, 0)}
        if name in self.bottlenecks:
            a = self.bottlenecks[name]
            return {"name": name, "family": "bottleneck", "width": a.width, "path": str(a.path), "bytes": a.nbytes,
                    "tier": "device", "requests_served": self.requests_served.get(name, 0)}
        if name in self.prompt_adapters:
            a = self.prompt_adapters[name]
            return {"name": name, "family": a.family, "peft_type": a.spec.peft_type, "virtual_tokens": a.num_virtual,
                    "path": str(a.spec.path), "bytes": a.nbytes, "tier": "device",
                    "requests_served": self.requests_served.get(name, 0)}
        a = self.loras.adapters[name]
        return {"name": name, "family": "lora", "peft_type": a.spec.peft_type, "rank": a.rank,
                "target_modules": a.targets, "dora": a.uses_dora, "path": str(a.spec.path), "bytes": a.nbytes,
                "tier": "device" if name in self.loras.slot_of else "cpu",
                "requests_served": self.requests_served.get(name, 0)}

    def _register_prompt(self, adapter: PromptAdapter) -> None:
        n = adapter.num_virtual
        if n >= self.max_model_len:
            raise AdapterError(f"{adapter.spec.path}: {n} virtual tokens leave no room in the context length "
                               f"of {self.max_model_len}")
        if adapter.prefix_kv is not None:
            # the prefix is written once into shared KV blocks that every request of this adapter reads
            bs = self.blocks.block_size
            if -(-n // bs) > self.blocks.num_free:
                raise AdapterError(f"{adapter.spec.path}: its {n}-token prefix needs {-(-n // bs)} KV blocks, "
                                   f"{self.blocks.num_free} are free")
            blocks = self.blocks.allocate_shared(-(-n // bs))
            slots = torch.tensor([blocks[i // bs] * bs + i % bs for i in range(n)], device=self.runner.device)
            kv = adapter.prefix_kv.to(self.runner.device, self.runner.dtype)
            for layer, (k_cache, v_cache) in enumerate(self.runner.kv_caches):
                ref.write_kv(k_cache, v_cache, kv[layer, 0].transpose(0, 1), kv[layer, 1].transpose(0, 1), slots)
            self.prefix_blocks[adapter.name] = tuple(blocks)
        self.prompt_adapters[adapter.name] = adapter

    def known_names(self) -> list[str]:
        """Every adapter a request may name: resident ones and those on disk."""
        return list(dict.fromkeys(self.adapter_names() + list(self.known)))

    def adapter_names(self) -> list[str]:
        loras = list(self.loras.adapters) if self.loras is not None else []
        return loras + list(self.prompt_adapters) + list(self.bottlenecks)


    def add_adapter_dir(self, folder: str) -> list[str]:
        """Make every adapter folder in `folder` known by its folder name; each is read on first use."""
        from adapters.paths import InvalidName, check_name

        added = []
        for sub in sorted(Path(folder).iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                check_name(sub.name)
            except InvalidName as exc:
                log.warning("skipping %s: %s", sub, exc)
                continue
            self.known.setdefault(sub.name, str(sub.resolve()))
            added.append(sub.name)
        return added

    def _adapter_fields(self, adapter: str | None) -> dict:
        if adapter in self.bottlenecks:
            return {"bottleneck_name": adapter}
        prompt = self.prompt_adapters.get(adapter) if adapter is not None else None
        if prompt is None:
            return {"lora_name": adapter}
        if prompt.soft_prompt is not None:
            return {"num_virtual": prompt.num_virtual, "soft_prompt": prompt.soft_prompt.to(self.runner.device)}
        blocks = self.prefix_blocks[adapter]
        return {"prefix_len": prompt.num_virtual, "kv_offset": len(blocks) * self.blocks.block_size,
                "prefix_blocks": blocks}
