"""The synchronous engine: add requests, abort them, step the batch forward, report stats.

Adapters are the registry's (families.registry): the engine pins a request's adapter while the
request lives, binds it when the adapter is resident (or parks the request while it is read from
disk), and asks the registry for each step's slots and hooks.
"""
from __future__ import annotations

import itertools
import logging
import random
import time

from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.detokenizer import append_text, find_stop, releasable_text
from quiver.server.engine.device import resolve_device
from quiver.server.engine.grammar import Grammars
from quiver.server.engine.model_runner import ModelRunner
from quiver.server.engine.outputs import EngineStats, RequestFailed, RequestOutput
from quiver.server.engine.requests import PreparedRequest, check_length
from quiver.server.engine.sampling import InvalidParam, SamplingParams
from quiver.server.engine.scheduler import Scheduler
from quiver.server.engine.sequence import Sequence, Status, TokenLogprob
from quiver.server.families.bottleneck import BottleneckFamily
from quiver.server.families.lora import LoraFamily
from quiver.server.families.prompt import PromptFamily
from quiver.server.families.registry import AdapterEvent, AdapterRegistry
from quiver.server.model.checkpoint import resolve_model

log = logging.getLogger(__name__)
STALL_SECONDS = 60.0  # requests waiting this long with no step running any of them: unhealthy


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        resolve_device(config.device)  # a device torch cannot use is refused before anything loads
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
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras, config.lora_starvation_steps)
        self.registry = AdapterRegistry(self._families(), config.max_cpu_loras)
        eos = set(self.runner.model_config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.grammars = Grammars(tokenizer, self.vocab_size, getattr(tokenizer, "eos_token_id", None) or min(eos))
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.num_preemptions = 0
        self.step_failures = 0
        self._failed_steps = 0  # steps in a row in which every row's forward failed
        self._last_progress = time.monotonic()  # the last step that ran a row (or found nothing to do)
        self.ran_rows = False  # whether the last step ran any row
        self.step_adapters = 0  # distinct adapters among the last step's rows (0 when none ran)

    def _families(self) -> list:
        c, r = self.config, self.runner
        files = dict(allow_pickle=c.allow_pickle, max_bytes=c.max_adapter_mb * 2**20)
        return [PromptFamily(r.model_config, r.ops, self.blocks, r.kv_caches, r.max_model_len, r.dtype, r.device, files),
                BottleneckFamily(r.model_config, r.ops, r.dtype, r.device, files),
                LoraFamily(r.model, r.ops, c.max_loras, c.max_lora_rank, files)]

    # ---- adapters (the registry's; these are the common calls) -----------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Read, check and register an adapter of any supported family; on any error nothing changes."""
        self.registry.register(self.registry.read(name, path))

    def unload_adapter(self, name: str) -> None:
        self.registry.unregister(name)

    def adapter_names(self) -> list[str]:
        return self.registry.names()

    def add_adapter_dir(self, folder: str) -> list[str]:
        """Make every adapter folder in `folder` known by its name, read on first use; a folder added there
        later is found by the next scan. Returns the names found now."""
        return self.registry.add_dir(folder)

    # ---- requests --------------------------------------------------------------------------
    def prepare(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> PreparedRequest:
        """Check a request once (any thread: it reads a snapshot of the adapters); raise InvalidParam,
        UnknownAdapter or AdapterFailed for one that cannot run."""
        if adapter is not None:
            self.registry.check_usable(adapter)
        if not prompt_ids:
            raise InvalidParam("prompt", "prompt must not be empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidParam("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        virtual = self.registry.virtual_tokens(adapter)
        self._check_length(len(prompt_ids), params.max_tokens, virtual)
        return PreparedRequest(list(prompt_ids), params, adapter, virtual)

    def _check_length(self, prompt: int, max_tokens: int, virtual: int) -> None:
        check_length(prompt, max_tokens, virtual, self.max_model_len, self.blocks.block_size,
                     self.blocks.num_blocks - self.blocks.num_shared)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None, fork_of: str | None = None) -> Sequence:
        """prepare() and add() in one call."""
        return self.add(self.prepare(prompt_ids, params, adapter), request_id, fork_of)

    def add(self, request: PreparedRequest, request_id: str | None = None, fork_of: str | None = None) -> Sequence:
        """Queue a prepared request. One naming an adapter on disk is parked until a worker has read it.

        fork_of: the id of an earlier request with the same prompt and adapter (another choice of the
        same n > 1 request): this one waits until that one has computed the prompt's full KV blocks,
        shares them, and computes only the rest of the prompt itself."""
        prompt_ids, params, adapter = request.prompt_ids, request.params, request.adapter
        if adapter is not None:
            self.registry.check_usable(adapter)  # not unloaded since it was prepared
            virtual = self.registry.virtual_tokens(adapter)
            if virtual != request.virtual_tokens:  # unloaded and loaded again as another adapter
                self._check_length(len(prompt_ids), params.max_tokens, virtual)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        leader = self.seqs.get(fork_of) if fork_of is not None else None
        if leader is not None and (leader.prompt_ids != prompt_ids or leader.adapter != adapter):
            raise ValueError("a fork has its leader's prompt and adapter")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        resident = adapter is None or self.registry.is_resident(adapter)
        binding = self.registry.bind(adapter) if adapter is not None and resident else None
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(rid, list(prompt_ids), params, seed=seed, adapter=adapter, binding=binding,
                       stop_ids=tuple(sorted(stop_ids)),
                       grammar=None if params.grammar is None else params.grammar.matcher())
        self.seqs[rid] = seq
        if leader is not None and leader.num_computed == 0:
            seq.fork_from = leader
            leader.forks.append(seq)
        if adapter is not None:
            self.registry.pin(adapter)
        if resident:
            self.scheduler.add(seq)
        else:
            seq.status = Status.PARKED
            self.registry.park(adapter, seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._retire(seq, "abort")

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Finish a request wherever it is: its blocks and its adapter pin go back."""
        self._release_forks(seq, share=False)
        if seq.fork_from is not None:
            seq.fork_from.forks.remove(seq)
            seq.fork_from = None
        if seq.status is Status.PARKED:
            self.registry.unpark(seq)
        if not seq.finished:
            self.scheduler.finish(seq, reason)
            if seq.adapter is not None:
                self.registry.unpin(seq.adapter)
        self.seqs.pop(seq.request_id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.registry.has_ready()

    def num_waiting(self) -> int:
        """Requests queued and not yet running, parked ones included."""
        return len(self.scheduler.waiting) + self.registry.num_parked()

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._unpark()
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        for seq in batch.failed:
            outputs.append(self._fail(seq, RequestFailed(
                "the request no longer fits in the KV cache beside the adapter prefixes it holds", "kv_cache_full", 503)))
        self.ran_rows = bool(batch)
        self.step_adapters = len({seq.adapter for seq, _ in batch.rows} - {None})
        if not batch:
            if not self.scheduler.has_work() or batch.preempted:
                self._last_progress = time.monotonic()
            return outputs
        now = time.monotonic()
        for seq, _ in batch.rows:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        outputs += self._forward(batch.rows)
        ran = any(seq.finish_reason != "error" for seq, _ in batch.rows)  # some row got through
        self._failed_steps = 0 if ran else self._failed_steps + 1
        if ran:
            self._last_progress = time.monotonic()
        self.registry.trim()
        return outputs

    def _forward(self, rows: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """One forward pass over `rows`. If it raises, the rows are retried in halves, so that only the
        request that causes the failure fails; the others produce the tokens they would have."""
        try:
            self.registry.begin_step([seq.binding for seq, _ in rows if seq.binding is not None])
            outcome = self.runner.step(rows, self.registry.step_hooks, self.blocks.fresh)
        except Exception as exc:  # noqa: BLE001 - isolated below, one row at a time at worst
            self.step_failures += 1
            if len(rows) == 1:
                log.exception("the forward pass failed for request %s alone: it fails", rows[0][0].request_id)
                return [self._fail(rows[0][0], RequestFailed(f"the model failed on this request: {exc}",
                                                             "step_failed"))]
            log.warning("a forward pass of %d rows failed (%s): retrying them in halves", len(rows), exc)
            half = len(rows) // 2
            return self._forward(rows[:half]) + self._forward(rows[half:])
        outputs = [self._fail(seq, RequestFailed("the model produced non-finite logits for this request (its "
                                                 "adapter's weights may be out of range)", "non_finite_logits"))
                   for seq in outcome.non_finite]
        for seq, n in rows:
            if not seq.finished:
                seq.num_computed += n
                self.blocks.commit(seq)
                if seq.forks:
                    self._release_forks(seq, share=True)
        now = time.monotonic()
        result = outcome.result
        for i, seq in enumerate(outcome.sampled):
            logprob = None
            if result.logprobs is not None and seq.params.logprobs is not None:
                logprob = TokenLogprob(result.tokens[i], result.logprobs[i], result.top[i][:seq.params.logprobs])
            outputs.append(self._append_token(seq, result.tokens[i], logprob, now))
        return outputs

    def _release_forks(self, leader: Sequence, share: bool) -> None:
        """Let the requests waiting on `leader`'s prompt go: sharing its full prompt blocks once they are
        computed (share), or computing the prompt themselves (the leader is gone)."""
        if not leader.forks:
            return
        bs = self.blocks.block_size
        full = (leader.num_virtual + leader.num_prompt_tokens - 1) // bs  # the last prompt token stays each one's
        if share and leader.num_computed < full * bs:
            return
        for seq in leader.forks:
            seq.fork_from = None
            if share and full:
                self.blocks.share(seq, leader.block_table[:len(leader.shared_blocks) + full])
                seq.num_computed = full * bs
        leader.forks = []

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        self._retire(seq, "error")
        return RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error", seq=seq, error=error)

    def health(self) -> str | None:
        """None when the engine makes progress; else why not."""
        if self._failed_steps >= 3:
            return f"the last {self._failed_steps} forward passes failed for every request"
        stalled = time.monotonic() - self._last_progress
        if self.scheduler.has_work() and stalled > STALL_SECONDS:
            return f"requests are waiting but no step has run one for {stalled:.0f} s"
        return None

    def _unpark(self) -> list[RequestOutput]:
        """Requests whose adapter has been read join the queue; those whose read failed end with its error."""
        failed = []
        for seqs, error in self.registry.take_ready():
            for seq in seqs:
                if error is None:
                    seq.bind(self.registry.bind(seq.adapter))
                    try:  # the adapter's virtual tokens are known only now
                        self._check_length(seq.num_prompt_tokens, seq.params.max_tokens, seq.num_virtual)
                    except InvalidParam as exc:
                        error = exc
                if error is None:
                    self.scheduler.add(seq)
                    continue
                failed.append(self._fail(seq, error))
        return failed

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
        if seq.grammar is not None and not seq.grammar.accept(token):
            return self._fail(seq, RequestFailed(f"token {token} broke the request's grammar", "grammar_rejected"))
        if token in seq.stop_ids:
            reason = "stop"
        else:
            before = len(seq.text)
            append_text(self.tokenizer, seq)
            if p.stop and len(seq.text) > before and seq.num_output_tokens >= p.min_tokens:
                end = find_stop(seq, before)
                if end is not None:
                    seq.text = seq.text[:end]
                    reason = "stop"
        if reason is None and seq.grammar is not None and seq.grammar.finished:
            reason = "stop"  # the grammar is complete and allows nothing but a stop token
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._retire(seq, reason)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token], new_text=releasable_text(seq),
            new_logprobs=[logprob] if logprob is not None else [], finished=seq.finished,
            finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=seq.prompt_logprobs if first and p.prompt_logprobs is not None else None, seq=seq)

    def fail_all(self, reason: str = "error") -> list[Sequence]:
        """Retire every request (after an internal error) so that all blocks and pins return."""
        failed = list(self.seqs.values())
        for seq in failed:
            self._retire(seq, reason)
        return failed

    # ---- observability ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        reason = self.health()
        # rows still running (finish() and schedule() drop the others already; the check keeps stats() right)
        running = [seq for seq in self.scheduler.running if seq.status is Status.RUNNING]
        waiting = self.scheduler.waiting
        return EngineStats(running=len(running), waiting=len(waiting),
                           kv_usage=self.blocks.usage, preemptions=self.num_preemptions,
                           adapters_resident=self.registry.resident(), adapter_evictions=self.registry.evictions(),
                           step_failures=self.step_failures, healthy=reason is None, unhealthy_reason=reason,
                           running_lora_adapters=_slot_adapters(running), waiting_lora_adapters=_slot_adapters(waiting),
                           max_loras=self.config.max_loras, step_adapters=self.step_adapters)

    def take_events(self) -> list[AdapterEvent]:
        """Adapter loads and unloads since the last call."""
        return self.registry.take_events()


def _slot_adapters(seqs) -> tuple[str, ...]:
    """The sorted distinct adapters of `seqs` that count against --max-loras (what vLLM's LoRA gauge lists)."""
    return tuple(sorted({seq.slot_adapter for seq in seqs} - {None}))
