"""The synchronous engine: add requests, abort them, and step the batch forward."""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import append_text, find_stop, releasable_text
from .engine_adapters import AdapterExists, AdapterInUse, AdapterRegistryMixin, UnknownAdapter  # noqa: F401
from .lora_manager import LoraManager
from .model_runner import ModelRunner
from .model_source import resolve_model
from .sampling import InvalidParam, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, TokenLogprob

log = logging.getLogger(__name__)


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


class LLMEngine(AdapterRegistryMixin):
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
        self.prompt_adapters: dict = {}  # name -> PromptAdapter
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
