"""The synchronous engine: add requests, abort them, step the batch forward, report stats; and the one
door to adapters, whoever loads them (the API, a start-up flag, a request's first use, another replica).

A step flows one way: the scheduler picks the rows, residency places their adapters, the engine builds
the Step (engine.step), the adapter families add their hooks, and the model runner runs it.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from concurrent.futures import Future

from quiver.server.engine.block_manager import BlockManager
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.detokenizer import append_tokens, releasable_text
from quiver.server.engine.device import resolve_device
from quiver.server.engine.grammar import Grammars
from quiver.server.engine.model_runner import ModelRunner, StepOutcome
from quiver.server.engine.outputs import EngineStats, RequestFailed, RequestOutput
from quiver.server.engine.requests import PreparedRequest, check_length, check_prompt
from quiver.server.engine.sampling import InvalidParam, SamplingParams
from quiver.server.engine.scheduler import Scheduler
from quiver.server.engine.sequence import Sequence, Status, TokenLogprob
from quiver.server.engine.speculate import Proposer, verify
from quiver.server.engine.step import build_step
from quiver.server.families import make_families
from quiver.server.families.catalog import AdapterCatalog
from quiver.server.families.errors import AdapterFailed
from quiver.server.families.loader import AdapterLoader, ReadAdapter
from quiver.server.families.residency import AdapterEvent, Residency
from quiver.server.model.checkpoint import resolve_model, served_names

log = logging.getLogger(__name__)
STALL_SECONDS = 60.0  # requests waiting this long with no step running any of them: unhealthy


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        resolve_device(config.device)  # a device torch cannot use is refused before anything loads
        self.model_dir, own_name = resolve_model(config.model)
        self.model_names, self.base_names = served_names(config.model, config.served_model_name, own_name)
        self.model_name = self.model_names[0]  # the name responses carry, the adapters' parent
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.runner = r = ModelRunner(config, self.model_dir)
        self.device, self.dtype, self.model_config = r.device, r.dtype, r.model_config
        self.max_model_len, self.vocab_size = r.max_model_len, r.model_config.vocab_size
        self.quantization, self.kernels = r.quantization, r.ops.name  # the base's 4-bit type; "torch" or "triton"
        self.observers = r.observers  # each called with (step, logits) after every forward pass
        self.blocks = BlockManager(r.num_blocks, config.block_size, caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.max_loras,
                                   config.lora_starvation_steps, Proposer.of(config.speculative_config, self.max_model_len, r))
        families = make_families(self.runner, self.blocks, config.max_loras, config.max_lora_rank,
                                 dict(allow_pickle=config.allow_pickle, max_bytes=config.max_adapter_mb * 2**20))
        self.catalog = AdapterCatalog()
        self.residency = Residency(families, self.catalog, config.max_cpu_loras)
        self.loader = AdapterLoader(families)
        eos = set(self.runner.model_config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.grammars = Grammars(tokenizer, self.vocab_size, getattr(tokenizer, "eos_token_id", None) or min(eos))
        self.seqs: dict[str, Sequence] = {}
        self._rng = random.SystemRandom() if config.seed is None else random.Random(config.seed)  # os.urandom
        self._ids = itertools.count()
        self.num_preemptions = 0
        self.step_failures = 0
        self._failed_steps = 0  # steps in a row in which every row's forward failed
        self._last_progress = time.monotonic()  # the last step that ran a row (or found nothing to do)
        self.ran_rows = False  # whether the last step ran any row
        self.step_adapters = 0  # distinct adapters among the last step's rows (0 when none ran)

    def weight_bytes(self) -> int:
        return self.runner.model.weight_bytes()

    def bind_thread(self) -> None:
        """Make this engine's device current on the calling thread (the one that steps it)."""
        self.runner.bind_thread()

    # ---- adapters: every load, whoever asks, reads through the loader and registers here ----------
    def read_adapter(self, name: str, path: str) -> Future:
        """Any thread: read an adapter folder on a reader thread; a future of its ReadAdapter."""
        return self.loader.submit(name, path)

    def register_adapter(self, read: ReadAdapter) -> dict:
        """Make a read adapter usable (engine thread, between steps); its info. On any error nothing changes."""
        self.residency.register(read)
        return self.residency.info(read.name)

    def load_adapter(self, name: str, path: str) -> dict:
        """Read and register now, on the calling thread's time (start-up, benchmarks)."""
        return self.register_adapter(self.read_adapter(name, path).result())

    def adopt_adapter(self, adapter, kind: str, path: str) -> dict:
        """Register an adapter parsed in host memory elsewhere (another engine, `quiver merge`)."""
        return self.register_adapter(self.loader.adopt(adapter, kind, path))

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter and free what it holds; AdapterInUse while a request holds it."""
        self.residency.unregister(name)

    def know_adapter(self, name: str, folder: str) -> None:
        """Make `name` known as `folder`, read on its first use (an adapter loaded on another replica)."""
        self.catalog.know(name, folder)

    def adapter_folder(self, name: str) -> str | None:
        return self.catalog.folder(name)

    def add_adapter_dir(self, folder: str) -> list[str]:
        """Make every adapter folder in `folder` known by its name, read on first use (later ones too, at
        the next rescan); the names found now."""
        return self.catalog.add_dir(folder)

    def rescan(self, name: str | None = None) -> None:
        """Any thread: make folders new in the adapter dirs known, unless `name` is (families.discovery)."""
        if name is None or name not in self.catalog:
            self.catalog.refresh(name)

    def known_adapters(self) -> list[str]:
        """Any thread: every adapter a request may name, resident or on disk."""
        return self.catalog.names()

    def adapter_names(self) -> list[str]:
        """Adapters read into memory (device or host)."""
        return self.residency.names()

    def list_adapters(self) -> list[dict]:
        """What GET /v1/adapters shows: resident adapters first, then those only on disk."""
        return [self.residency.info(n) for n in dict.fromkeys(self.residency.names() + self.catalog.names())]

    def on_adapter_read(self, callback) -> None:
        """Call `callback` (from a reader thread) when a first-use read has finished: step() takes it."""
        self.loader.on_ready = callback

    def virtual_tokens(self, adapter: str | None) -> int:
        """Any thread (a snapshot): context tokens the adapter spends before a request's own."""
        return self.residency.virtual_tokens(adapter)

    # ---- requests --------------------------------------------------------------------------
    def prepare(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> PreparedRequest:
        """Check a request once (any thread: it reads a snapshot of the adapters); raise InvalidParam,
        UnknownAdapter or AdapterFailed for one that cannot run."""
        if adapter is not None:
            self.catalog.check_usable(adapter)
        check_prompt(prompt_ids, self.vocab_size)
        params.validate(self.vocab_size)
        virtual = self.residency.virtual_tokens(adapter)
        check_length(len(prompt_ids), params.max_tokens, virtual, self.max_model_len, self.blocks)
        return PreparedRequest(list(prompt_ids), params, adapter, virtual)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None, fork_of: str | None = None) -> Sequence:
        """prepare() and add() in one call."""
        return self.add(self.prepare(prompt_ids, params, adapter), request_id, fork_of)

    def add(self, request: PreparedRequest, request_id: str | None = None, fork_of: str | None = None) -> Sequence:
        """Queue a prepared request. One naming an adapter on disk is parked until a worker has read it.

        fork_of: the id of an earlier request with the same prompt and adapter (another choice of the
        same n > 1 request): this one waits until that one has computed the prompt's full KV blocks,
        takes them from the block manager as a cache hit, and computes only the rest of the prompt."""
        prompt_ids, params, adapter = request.prompt_ids, request.params, request.adapter
        if adapter is not None:
            self.catalog.check_usable(adapter)  # not unloaded since it was prepared
            virtual = self.residency.virtual_tokens(adapter)
            if virtual != request.virtual_tokens:  # unloaded and loaded again as another adapter
                check_length(len(prompt_ids), params.max_tokens, virtual, self.max_model_len, self.blocks)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        leader = self.seqs.get(fork_of) if fork_of is not None else None
        if leader is not None and (leader.prompt_ids != prompt_ids or leader.adapter != adapter):
            raise ValueError("a fork has its leader's prompt and adapter")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        resident = adapter is None or self.residency.is_resident(adapter)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(rid, list(prompt_ids), params, seed=seed, adapter=adapter,
                       binding=self.residency.bind(adapter) if adapter is not None and resident else None,
                       stop_ids=tuple(sorted(stop_ids)), cache_salt=request.cache_salt,
                       grammar=None if params.grammar is None else params.grammar.matcher())
        self.seqs[rid] = seq
        if leader is not None and leader.num_computed == 0:
            seq.fork_from, seq.prompt_group = leader, leader.prompt_group
            leader.forks.append(seq)
        if adapter is not None:
            self.residency.pin(adapter)
        if resident:
            self.scheduler.add(seq)
        else:
            seq.status = Status.PARKED
            self.loader.park(adapter, self.catalog.folder(adapter), seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._retire(seq, "abort")

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Finish a request wherever it is: its blocks and its adapter pin go back."""
        self.blocks.release_forks(seq, share=False)
        if seq.fork_from is not None:
            seq.fork_from.forks.remove(seq)
            seq.fork_from = None
        if seq.status is Status.PARKED:
            self.loader.unpark(seq)
        if not seq.finished:
            self.scheduler.finish(seq, reason)
            if seq.adapter is not None:
                self.residency.unpin(seq.adapter)
        self.seqs.pop(seq.request_id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.loader.has_ready()

    def num_waiting(self) -> int:
        """Requests queued and not yet running, parked ones included."""
        return len(self.scheduler.waiting) + self.loader.num_parked()

    # ---- stepping --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._unpark()
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        for seq in batch.failed:
            outputs.append(self._fail(seq, RequestFailed("the request no longer fits in the KV cache beside the "
                                                         "adapter prefixes it holds", "kv_cache_full", 503)))
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
        self.residency.trim()
        return outputs

    def _run(self, rows: list[tuple[Sequence, int]]) -> StepOutcome:
        """One forward pass: adapters placed, the Step built and filled, the runner runs it."""
        self.residency.place([seq.binding for seq, _ in rows if seq.binding is not None])
        step = build_step(rows, self.blocks.block_size, self.runner.pad_block, self.vocab_size, self.blocks.fresh)
        self.residency.prepare(step)
        try:
            return self.runner.run(step)
        finally:
            if step.zeroed:  # once only: a retried step must not wipe what a first part wrote since
                self.blocks.fresh.clear()

    def _forward(self, rows: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """One forward pass over `rows`. If it raises, the rows are retried in halves, so that only the
        request that causes the failure fails; the others produce the tokens they would have."""
        try:
            outcome = self._run(rows)
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
        result = outcome.result
        emitted = verify(outcome.sampled, result.tokens if result else [])  # rid -> (tokens, their draws)
        for seq, n in rows:
            if not seq.finished:
                if seq.request_id in emitted:  # K/V at rejected drafts' positions is not kept
                    n -= len(seq.draft) + 1 - len(emitted[seq.request_id][0])
                seq.num_computed += n
                self.blocks.commit(seq)
                self.blocks.release_forks(seq, share=True)
        now = time.monotonic()
        for rid, (tokens, draws) in emitted.items():
            logprobs = result.logprobs_of(draws, self.seqs[rid].params.logprobs)
            outputs.append(self._append(self.seqs[rid], tokens, logprobs, now))
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        self._retire(seq, "error")
        return RequestOutput.failed(seq, error)

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
        for name, result, seqs in self.loader.take_ready():
            error = self.residency.admit(name, result)
            for seq in seqs:
                try:
                    if error is not None:
                        raise error
                    seq.bind(self.residency.bind(seq.adapter))  # its virtual tokens are known only now:
                    check_length(seq.num_prompt_tokens, seq.params.max_tokens, self.residency.virtual_tokens(name),
                                 self.max_model_len, self.blocks)
                    self.scheduler.add(seq)
                except (AdapterFailed, InvalidParam) as exc:
                    failed.append(self._fail(seq, exc))
        return failed

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob], now: float) -> RequestOutput:
        first = seq.first_token_time is None
        seq.first_token_time = now if first else seq.first_token_time
        seq.prev_token_time, seq.last_token_time = seq.last_token_time, now
        drafted, seq.draft = len(seq.draft), []
        kept, reason = append_tokens(self.tokenizer, seq, tokens, logprobs, self.max_model_len)
        if reason == "grammar_rejected":
            return self._fail(seq, RequestFailed(f"token {tokens[kept - 1]} broke the request's grammar", reason))
        if reason is not None:
            self._retire(seq, reason)
        return RequestOutput.tokens(seq, tokens[:kept], releasable_text(seq), logprobs[:kept], first, drafted,
                                    min(kept, len(tokens) - 1))

    def fail_all(self, reason: str = "error") -> list[Sequence]:
        """Retire every request (after an internal error) so that all blocks and pins return."""
        failed = list(self.seqs.values())
        for seq in failed:
            self._retire(seq, reason)
        return failed

    # ---- observability ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats.of(self)

    def take_events(self) -> list[AdapterEvent]:
        """Adapter loads and unloads since the last call."""
        return self.residency.take_events()
