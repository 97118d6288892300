"""The synchronous engine: add requests, abort them, and step the batch forward."""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.bottleneck import load_bottleneck
from adapters.errors import AdapterError
from adapters.lora import load_lora
from adapters.prompt import PromptAdapter, load_prompt_adapter
from adapters.spec import detect_family
from kernels import ref

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import append_text, find_stop, releasable_text
from .model_runner import ModelRunner
from .model_source import resolve_model
from .sampling import InvalidParam, SamplingParams
from .lora_manager import LoraManager
from .lora_slots import module_shapes
from .scheduler import Scheduler
from .sequence import Sequence, TokenLogprob

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


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output only
    seq: Sequence | None = None  # for timing metrics; read-only to consumers


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        model_dir, default_name = resolve_model(config.model)
        self.model_dir = model_dir
        self.model_name = config.served_model_name or default_name
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config, model_dir)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model_config.vocab_size
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras, config.lora_starvation_steps)
        self.loras = LoraManager(self.runner.lora_slots) if self.runner.lora_slots is not None else None
        self.prompt_adapters: dict[str, PromptAdapter] = {}
        self.prefix_blocks: dict[str, tuple[int, ...]] = {}
        self.bottlenecks: dict = {}  # name -> BottleneckAdapter
        self.requests_served: dict[str, int] = {}
        self.known: dict[str, str] = {}  # name -> folder, for adapters that can be (re)read from disk
        self.cpu_evictions = 0
        eos = set(self.runner.model_config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.num_preemptions = 0

    # ---- adapters --------------------------------------------------------------------------
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


    # ---- requests --------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        """Raise InvalidParam / UnknownAdapter for a request that cannot run."""
        if adapter is not None and adapter not in self.adapter_names() and adapter not in self.known:
            raise UnknownAdapter(adapter)
        if not prompt_ids:
            raise InvalidParam("prompt", "prompt must not be empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidParam("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        virtual = self.prompt_adapters[adapter].num_virtual if adapter in self.prompt_adapters else 0
        if virtual + len(prompt_ids) + params.max_tokens > self.max_model_len:
            extra = f" + the adapter's {virtual} virtual tokens" if virtual else ""
            raise InvalidParam(
                "max_tokens", f"prompt ({len(prompt_ids)} tokens){extra} + max_tokens ({params.max_tokens}) "
                f"exceeds the context length of {self.max_model_len} tokens")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None) -> Sequence:
        self.check_request(prompt_ids, params, adapter)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        seq = Sequence(rid, list(prompt_ids), params, seed=seed, adapter=adapter, **self._adapter_fields(adapter))
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        if adapter is not None:
            self.requests_served[adapter] = self.requests_served.get(adapter, 0) + 1
        return seq

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

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if not batch:
            return []
        now = time.monotonic()
        for seq, _ in batch.rows:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        if self.loras is not None:
            slot_of = self.loras.activate({seq.lora_name for seq, _ in batch.rows if seq.lora_name is not None})
            for seq, _ in batch.rows:
                seq.lora_slot = slot_of[seq.lora_name] if seq.lora_name is not None else -1
        if self.bottlenecks:
            slot_of = self.runner.bottleneck_slots.slot_of
            for seq, _ in batch.rows:
                seq.bottleneck_slot = slot_of(seq.bottleneck_name) if seq.bottleneck_name is not None else -1
        sampled, result = self.runner.step(batch.rows)
        for seq, n in batch.rows:
            seq.num_computed += n
        if result is None:
            return []
        now = time.monotonic()
        outputs = []
        for i, seq in enumerate(sampled):
            logprob = None
            if result.logprobs is not None and seq.params.logprobs is not None:
                logprob = TokenLogprob(result.tokens[i], result.logprobs[i], result.top[i][:seq.params.logprobs])
            outputs.append(self._append_token(seq, result.tokens[i], logprob, now))
        if self.loras is not None and self.config.max_cpu_loras is not None \
                and len(self.loras.adapters) > self.config.max_cpu_loras:
            self._trim_cpu_tier(set())  # adapters that were all busy when read may be idle now
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = now
        seq.prev_token_time, seq.last_token_time = seq.last_token_time, now
        seq.token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        p = seq.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        else:
            before = len(seq.text)
            append_text(self.tokenizer, seq)
            if p.stop and len(seq.text) > before:
                idx = find_stop(seq, before)
                if idx is not None:
                    seq.text = seq.text[:idx]
                    reason = "stop"
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token], new_text=releasable_text(seq),
            new_logprobs=[logprob] if logprob is not None else [], finished=seq.finished,
            finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            prompt_logprobs=seq.prompt_logprobs if first and p.prompt_logprobs is not None else None, seq=seq)

    def fail_all(self, reason: str = "error") -> list[Sequence]:
        """Retire every request (after an internal error) so that all blocks return."""
        failed = list(self.seqs.values())
        for seq in failed:
            self.abort(seq.request_id)
            seq.finish_reason = reason
        return failed
