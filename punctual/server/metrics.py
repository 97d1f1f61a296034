"""Prometheus metrics of the server: latency histograms observed in the front end, engine gauges from the core.

Each server owns its registry (no process-wide globals), so several apps can live in one process.
The engine's numbers (queue, KV blocks, preemptions) are read from the core's latest report at
scrape time rather than copied into gauges on every step.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from punctual.engine.stats import EngineStats
from punctual.engine.tasks import TaskFailures
from punctual.engine.output_processor import ParentState
from punctual.spec_decode.speculator import SpecStats

# Seconds. Latency-first: fine resolution below 100 ms, where interactive SLOs live.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class EngineStatsCollector:
    """Exports the core's latest EngineStats at scrape time; a cluster's per replica, labelled `replica`."""

    def __init__(self, read_stats: Callable[[], EngineStats | dict[str, EngineStats] | None],
                 read_alive: Callable[[], bool], read_failures: Callable[[], TaskFailures] | None = None):
        self.read_stats = read_stats
        self.read_alive = read_alive
        self.read_failures = read_failures

    def collect(self):
        alive = GaugeMetricFamily("punctual_engine_alive", "1 while the engine core process is running")
        alive.add_metric([], 1.0 if self.read_alive() else 0.0)
        yield alive
        if self.read_failures is not None:
            failed = CounterMetricFamily("punctual_background_task_failures",
                                         "Background tasks of the engine client (migrations, rejoins) that failed, "
                                         "by kind", labels=["task"])
            for task, count in sorted(self.read_failures().by_task.items()):
                failed.add_metric([task], float(count))
            yield failed
        reports = self.read_stats()
        if reports is None:
            return
        # One engine: unlabelled, as before clusters. Replicas: one sample per replica.
        labelled = isinstance(reports, dict)
        reports = reports if labelled else {"": reports}
        families: dict[str, object] = {}
        for replica, stats in reports.items():
            for kind, name, doc, value in self._samples(stats):
                family = families.get(name)
                if family is None:
                    labels = ["replica"] if labelled else []
                    family = families[name] = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                        name, doc, labels=labels)
                family.add_metric([replica] if labelled else [], float(value))
            for family in [*self._speculation(stats, replica if labelled else None),
                           *self._lora(stats, replica if labelled else None)]:
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()

    @staticmethod
    def _samples(stats: EngineStats):
        """(kind, name, help, value) of each engine gauge and counter."""
        gauges = {
            "punctual_num_requests_waiting": ("Requests queued in the engine core", stats.num_waiting),
            "punctual_num_requests_running": ("Requests running in the engine core", stats.num_running),
            "punctual_kv_blocks_used": ("KV cache blocks in use", stats.kv_blocks_used),
            "punctual_kv_blocks_free": ("KV cache blocks free", stats.kv_blocks_free),
            "punctual_kv_blocks_total": ("KV cache blocks in the pool", stats.kv_blocks_total),
            "punctual_prefix_cached_blocks": ("Free blocks whose KV the prefix cache still holds",
                                              stats.prefix_cached_blocks),
            "punctual_kv_tier_blocks": ("Evicted KV blocks held by the second tier", stats.kv_tier_blocks),
        }
        if stats.output_length_rank_correlation is not None:
            gauges["punctual_sjf_output_length_rank_correlation"] = (
                "Spearman rank correlation of predicted vs actual output lengths (sjf policy)",
                stats.output_length_rank_correlation)
        for name, (doc, value) in gauges.items():
            yield "gauge", name, doc, value
        counters = {
            "punctual_num_preemptions": ("Requests preempted by the scheduler", stats.num_preemptions),
            "punctual_engine_steps": ("Engine core steps run", stats.num_steps),
            "punctual_engine_generation_tokens": ("Tokens the core generated (per replica in a cluster)",
                                                  stats.generation_tokens),
            "punctual_engine_prompt_tokens_computed": (
                "Prompt tokens the core computed, recomputation after preemption included",
                stats.prompt_tokens_computed),
            "punctual_prefix_cache_queries": ("Prompt tokens looked up in the prefix cache",
                                              stats.prefix_cache_queries),
            "punctual_prefix_cache_hits": ("Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
            "punctual_prefix_cache_evictions": ("Cached KV blocks evicted for space", stats.prefix_cache_evictions),
            "punctual_prefix_cache_tier_hits": ("Prompt tokens restored from the second KV tier",
                                                stats.prefix_cache_tier_hits),
            "punctual_kv_tier_stored_blocks": ("KV blocks copied out to the second tier", stats.kv_tier_stored),
            "punctual_kv_tier_restored_blocks": ("KV blocks copied back from the second tier",
                                                 stats.kv_tier_restored),
        }
        for name, (doc, value) in counters.items():
            yield "counter", name, doc, value

    @staticmethod
    def _lora(stats: EngineStats, replica: str | None = None):
        """LoRA adapters: loaded, loads, slot swaps, and per adapter running and slot-waiting requests."""
        if not stats.lora_enabled:
            return
        base_labels, base_values = ([], []) if replica is None else (["replica"], [replica])
        for family_type, name, doc, value in (
                (GaugeMetricFamily, "punctual_lora_adapters_loaded", "LoRA adapters loaded in memory",
                 stats.lora_adapters_loaded),
                (CounterMetricFamily, "punctual_lora_loads", "LoRA adapters read from disk", stats.lora_loads),
                (CounterMetricFamily, "punctual_lora_swaps",
                 "LoRA slots handed from one adapter to another", stats.lora_swaps)):
            family = family_type(name, doc, labels=base_labels)
            family.add_metric(base_values, float(value))
            yield family
        for name, doc, per_adapter in (
                ("punctual_lora_requests_running", "Running requests, per LoRA adapter", stats.lora_running),
                ("punctual_lora_requests_waiting_for_slot",
                 "Waiting requests whose LoRA adapter finds no free slot, per adapter", stats.lora_waiting_for_slot)):
            gauge = GaugeMetricFamily(name, doc, labels=["adapter", *base_labels])
            for adapter, count in per_adapter.items():
                gauge.add_metric([adapter, *base_values], float(count))
            yield gauge

    @staticmethod
    def _speculation(stats: EngineStats, replica: str | None = None):
        """Speculative decoding, labelled by proposer (ngram or draft); absent when it is off."""
        if stats.spec_method is None:
            return
        method = stats.spec_method
        labels, values = (["method"], [method]) if replica is None else (["method", "replica"], [method, replica])
        for name, doc, value in (
                ("punctual_spec_proposed_tokens", "Speculative tokens proposed", stats.spec_proposed_tokens),
                ("punctual_spec_accepted_tokens", "Speculative tokens accepted", stats.spec_accepted_tokens),
                ("punctual_spec_verifications", "Request-steps that verified speculative tokens",
                 stats.spec_verifications)):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(values, float(value))
            yield counter
        spec = SpecStats(method, stats.spec_proposed_tokens, stats.spec_accepted_tokens, stats.spec_verifications)
        for name, doc, value in (
                ("punctual_spec_acceptance_rate", "Accepted / proposed speculative tokens", spec.acceptance_rate),
                ("punctual_spec_mean_acceptance_length",
                 "Tokens a verifying request-step yields: accepted proposals + the one every step makes",
                 spec.mean_acceptance_length)):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, float(value))
            yield gauge


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "punctual_time_to_first_token_seconds", "HTTP arrival to the first token in the front end",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "punctual_time_per_output_token_seconds", "Mean gap between output tokens of a finished request",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "punctual_inter_token_latency_seconds", "Gap between consecutive tokens of a sample",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "punctual_e2e_request_latency_seconds", "HTTP arrival to the last token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("punctual_prompt_tokens", "Prompt tokens of admitted requests (per sample)",
                                     registry=r)
        self.generation_tokens = Counter("punctual_generation_tokens", "Tokens generated", registry=r)
        self.requests_finished = Counter("punctual_requests_finished", "Requests finished, by reason",
                                         ["finish_reason"], registry=r)
        self.queue_time = Histogram(
            "punctual_request_queue_time_seconds", "Arrival to first scheduled in the engine core",
            buckets=LATENCY_BUCKETS, registry=r)
        self.slo_outcomes = Counter("punctual_slo_outcomes", "Finished requests that met or missed an SLO",
                                    ["slo", "outcome"], registry=r)
        # Per tenant of an API key (server/auth.py): the key file bounds the label's values. Not
        # per `user`: that field is the client's to fill, so its values are unbounded.
        self.tenant_requests = Counter("punctual_tenant_requests_finished",
                                       "Requests finished (per sample), by API-key tenant", ["tenant"], registry=r)
        self.tenant_prompt_tokens = Counter("punctual_tenant_prompt_tokens",
                                            "Prompt tokens of admitted requests (per sample), by API-key tenant",
                                            ["tenant"], registry=r)
        self.tenant_cached_tokens = Counter("punctual_tenant_prefix_cache_hits",
                                            "Prompt tokens found in the prefix cache, by API-key tenant",
                                            ["tenant"], registry=r)
        self.tenant_generation_tokens = Counter("punctual_tenant_generation_tokens",
                                                "Tokens generated for finished requests, by API-key tenant",
                                                ["tenant"], registry=r)

    def watch_engine(self, read_stats: Callable[[], EngineStats | None], read_alive: Callable[[], bool],
                     read_failures: Callable[[], TaskFailures] | None = None) -> None:
        self.registry.register(EngineStatsCollector(read_stats, read_alive, read_failures))

    def observe_tenant_admitted(self, tenant: str, prompt_tokens: int) -> None:
        self.tenant_prompt_tokens.labels(tenant).inc(prompt_tokens)

    def observe_finished(self, parent: ParentState, tenant: str | None = None) -> None:
        if tenant is not None:
            self.tenant_requests.labels(tenant).inc(len(parent.samples))
            self.tenant_generation_tokens.labels(tenant).inc(sum(len(s.token_ids) for s in parent.samples))
            self.tenant_cached_tokens.labels(tenant).inc(
                sum(s.metrics.get("num_cached_tokens", 0) for s in parent.samples if s.metrics is not None))
        m = parent.metrics
        if m.finished_time is not None:
            self.e2e_request_latency.observe(m.finished_time - m.arrival_time)
        for sample in parent.samples:
            self.requests_finished.labels(sample.finish_reason or "unknown").inc()
            if sample.first_token_time is not None and len(sample.token_ids) > 1 and m.finished_time is not None:
                self.time_per_output_token.observe(
                    (m.finished_time - sample.first_token_time) / (len(sample.token_ids) - 1))

    def observe_core_metrics(self, record: dict) -> None:
        """The core's latency record of a finished request (ms, and whether each SLO was met)."""
        if record.get("queue_time_ms") is not None:
            self.queue_time.observe(record["queue_time_ms"] / 1000)
        for slo in ("ttft", "tpot"):
            met = record.get(f"{slo}_slo_met")
            if met is not None:
                self.slo_outcomes.labels(slo, "met" if met else "missed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
