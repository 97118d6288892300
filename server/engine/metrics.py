"""Prometheus metrics; per-request figures carry an `adapter` label ("base" for none).

The adapter label set is bounded: an adapter's series are dropped when it is unloaded, and past
`max_adapters` labelled adapters the rest share the OTHER label (no adapter may be named like it: names
start with a letter or digit; "base" is refused as an adapter name by adapters.paths.check_name).

The `vllm:*` gauges are the names the Gateway API Inference Extension's model-server protocol scrapes,
so that a Quiver pod can sit behind a LoRA-aware Kubernetes gateway unchanged.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_ADAPTERS = 64  # adapters with series of their own (--max-metric-adapters)
BASE, OTHER = "base", "_other"


class LoraRequestsInfo:
    """vllm:lora_requests_info: one series, its value the Unix time of its last update.

    vLLM keeps every label set it ever set; gateways then pick the newest by value. We keep only the
    current one, replaced whole, so a scrape sees the old series or the new one: a Gauge cleared and
    re-labelled could show no series, or one valued 0, to a scrape between those calls."""

    name, labels = "vllm:lora_requests_info", ("max_lora", "running_lora_adapters", "waiting_lora_adapters")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.series: tuple[tuple[str, str, str], float] | None = None
        registry.register(self)

    def set(self, max_lora: int, running: tuple[str, ...], waiting: tuple[str, ...]) -> None:
        self.series = ((str(max_lora), ",".join(running), ",".join(waiting)), time.time())

    def collect(self):
        family = GaugeMetricFamily(self.name, "Running and waiting LoRA adapters; value: Unix time of the update",
                                   labels=self.labels)
        series = self.series
        if series is not None:
            family.add_metric(*series)
        yield family

    def describe(self):
        return [GaugeMetricFamily(self.name, "", labels=self.labels)]


class Metrics:
    def __init__(self, max_adapters: int = MAX_ADAPTERS) -> None:
        self.max_adapters = max_adapters
        self._labels: set[str] = set()  # adapters with series of their own
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("quiver_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("quiver_inter_token_latency_seconds", "Time between output tokens", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("quiver_e2e_request_latency_seconds", "Arrival to last token", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("quiver_request_queue_time_seconds", "Arrival to first scheduled", ["adapter"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("quiver_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("quiver_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("quiver_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("quiver_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.requests = Counter("quiver_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.preemptions = Counter("quiver_preemptions", "Requests preempted for recompute", registry=r)
        self.rejected = Counter("quiver_requests_rejected", "Requests refused before queueing (503)", ["reason"],
                                registry=r)
        self.tenant_requests = Counter("quiver_tenant_requests", "Generation requests admitted per tenant of "
                                       "--api-keys-file (its tenants are the only labels)", ["tenant"], registry=r)
        self.healthy = Gauge("quiver_engine_healthy", "1 while the engine makes progress, else 0 (see /health)",
                             registry=r)
        self.step_failures = Counter("quiver_step_failures", "Forward passes that raised (each retried without "
                                     "the request that caused it)", registry=r)
        self._step_failures_seen = 0
        self._preemptions_seen = 0
        self.adapter_loads = Counter("quiver_adapter_loads", "Adapters loaded (at start, through the API or on "
                                     "first use)", ["family"], registry=r)
        self.adapter_unloads = Counter("quiver_adapter_unloads", "Adapters unloaded", ["family"], registry=r)
        self.adapter_load_seconds = Histogram("quiver_adapter_load_seconds", "Request to adapter usable",
                                              ["family"], buckets=LATENCY_BUCKETS, registry=r)
        self.slot_evictions = Counter("quiver_adapter_evictions", "Adapters moved out of a tier to make room",
                                      ["tier"], registry=r)
        self.resident = Gauge("quiver_adapters_resident", "Adapters held per tier", ["tier"], registry=r)
        self.prefix_queries = Counter("quiver_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      ["adapter"], registry=r)
        self.prefix_hits = Counter("quiver_prefix_cache_hits", "Prompt tokens whose K/V came from the prefix cache",
                                   ["adapter"], registry=r)
        self.spec_drafts = Counter("quiver_spec_decode_num_draft_tokens", "Draft tokens verified (speculative "
                                   "decoding, --speculative-config)", ["adapter"], registry=r)
        self.spec_accepted = Counter("quiver_spec_decode_num_accepted_tokens", "Draft tokens accepted (their ratio "
                                     "to the drafts is the acceptance rate)", ["adapter"], registry=r)
        self.weights = Gauge("quiver_model_weight_bytes", "Bytes the base model's weights hold (4-bit projections "
                             "packed, their dequantization scratch included)", ["quantization"], registry=r)
        self._evictions_seen: dict[str, int] = {}
        self.step_adapters = Histogram("quiver_step_adapters", "Distinct adapters among a forward step's rows "
                                       "(base rows not counted)", buckets=ADAPTER_BUCKETS, registry=r)
        # the model-server protocol's names (vLLM's), for gateways
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch", registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.vllm_kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1: full)", registry=r)
        self.vllm_gpu_cache_usage = Gauge("vllm:gpu_cache_usage_perc", "Fraction of KV blocks in use (1: full; "
                                          "the older name of vllm:kv_cache_usage_perc)", registry=r)
        self.lora_info = LoraRequestsInfo(r)

    def observe_step(self, stats, outputs, ran_rows: bool = False) -> None:
        """stats: the engine's EngineStats after the step; outputs: its RequestOutputs; ran_rows: whether the
        step ran a forward pass (then its adapter mix is observed; a step that found nothing to run is not)."""
        self.observe_state(stats)
        if ran_rows:
            self.step_adapters.observe(stats.step_adapters)
        for out in outputs:
            seq = out.seq
            label = self.label(seq.adapter)
            if out.error is not None:  # failed before it ran (its adapter could not be read)
                self.requests.labels(label, "error").inc()
                continue
            self.generation_tokens.labels(label).inc(len(out.new_token_ids))
            if out.num_draft_tokens:
                self.spec_drafts.labels(label).inc(out.num_draft_tokens)
                self.spec_accepted.labels(label).inc(out.num_accepted_tokens)
            if seq.num_output_tokens == 1:
                self.ttft.labels(label).observe(seq.first_token_time - seq.arrival_time)
                self.queue.labels(label).observe(seq.first_scheduled_time - seq.arrival_time)
                self.prompt_tokens.labels(label).inc(seq.num_prompt_tokens)
                self.prefix_queries.labels(label).inc(seq.num_prompt_tokens)
                self.prefix_hits.labels(label).inc(seq.num_cached_tokens)
            elif seq.prev_token_time is not None:
                self.itl.labels(label).observe(seq.last_token_time - seq.prev_token_time)
            if out.finished:
                self.e2e.labels(label).observe(seq.last_token_time - seq.arrival_time)
                self.requests.labels(label, out.finish_reason).inc()

    def observe_state(self, stats) -> None:
        """The gauges, and the counters kept as totals, from the engine's EngineStats (after a step or when idle)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        for tier, n in stats.adapters_resident.items():
            self.resident.labels(tier).set(n)
        for tier, n in stats.adapter_evictions.items():
            seen = self._evictions_seen.get(tier, 0)
            if n > seen:
                self.slot_evictions.labels(tier).inc(n - seen)
                self._evictions_seen[tier] = n
        self.healthy.set(1 if stats.healthy else 0)
        if stats.step_failures > self._step_failures_seen:
            self.step_failures.inc(stats.step_failures - self._step_failures_seen)
            self._step_failures_seen = stats.step_failures
        if stats.preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.preemptions
        self.vllm_running.set(stats.running)
        self.vllm_waiting.set(stats.waiting)
        self.vllm_kv_usage.set(stats.kv_usage)
        self.vllm_gpu_cache_usage.set(stats.kv_usage)
        self.lora_info.set(stats.max_loras, stats.running_lora_adapters, stats.waiting_lora_adapters)

    def label(self, adapter: str | None) -> str:
        """The `adapter` label of a request's figures: BASE, the adapter's name, or OTHER past the cap."""
        if adapter is None:
            return BASE
        if adapter not in self._labels and len(self._labels) < self.max_adapters:
            self._labels.add(adapter)
        return adapter if adapter in self._labels else OTHER

    def drop(self, adapter: str) -> None:
        """Remove an unloaded adapter's series (those of OTHER stay), freeing its place under the cap."""
        if adapter in self._labels:
            self._labels.discard(adapter)
            for metric in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens,
                           self.requests, self.prefix_queries, self.prefix_hits, self.spec_drafts, self.spec_accepted):
                metric.remove_by_labels({"adapter": adapter})

    def observe_events(self, events) -> None:
        """events: the engine's AdapterEvents (loads and unloads) since the last call."""
        for e in events:
            if e.kind == "load":
                self.adapter_loads.labels(e.family).inc()
                self.adapter_load_seconds.labels(e.family).observe(e.seconds)
            else:
                if e.family is not None:
                    self.adapter_unloads.labels(e.family).inc()
                self.drop(e.name)

    def render(self) -> bytes:
        """The exposition text (any thread: the HTTP side renders it off the event loop)."""
        return generate_latest(self.registry)
