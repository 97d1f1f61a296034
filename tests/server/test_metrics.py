"""The engine's numbers as Prometheus exports them, read from a stats report."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from punctual.engine.stats import EngineStats
from punctual.server.metrics import EngineStatsCollector


def scrape(stats: EngineStats) -> str:
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: stats, lambda: True))
    return generate_latest(registry).decode()


def base_stats(**fields) -> EngineStats:
    return EngineStats(num_running=1, num_waiting=0, kv_blocks_total=10, kv_blocks_used=2, num_preemptions=0,
                       num_steps=5, prompt_tokens_computed=40, generation_tokens=12, **fields)


def test_speculation_metrics_are_labelled_by_method():
    text = scrape(base_stats(spec_method="ngram", spec_proposed_tokens=10, spec_accepted_tokens=6,
                             spec_verifications=4))
    assert 'punctual_spec_proposed_tokens_total{method="ngram"} 10.0' in text
    assert 'punctual_spec_accepted_tokens_total{method="ngram"} 6.0' in text
    assert 'punctual_spec_verifications_total{method="ngram"} 4.0' in text
    assert 'punctual_spec_acceptance_rate{method="ngram"} 0.6' in text
    assert 'punctual_spec_mean_acceptance_length{method="ngram"} 2.5' in text


def test_no_speculation_metrics_when_it_is_off():
    text = scrape(base_stats())
    assert "punctual_spec_" not in text
    assert "punctual_num_requests_running 1.0" in text


def test_cluster_totals_merge_every_replicas_lists_and_per_adapter_counts():
    """A cluster's /metrics sums the replicas: per-adapter counts by name and the adapters held
    come from every replica, not the first one's alone."""
    a = base_stats(lora_enabled=True, lora_running={"x": 2}, lora_adapters=["x"], output_length_rank_correlation=0.5)
    b = base_stats(lora_enabled=False, lora_running={"x": 1, "y": 4}, lora_adapters=["y", "x"],
               output_length_rank_correlation=None, spec_method="ngram")
    total = EngineStats.merged([a, b])
    assert total.num_running == 2 and total.kv_blocks_total == 20 and total.generation_tokens == 24
    assert total.lora_running == {"x": 3, "y": 4}
    assert total.lora_adapters == ["x", "y"]
    assert total.lora_enabled is True
    assert total.output_length_rank_correlation == 0.5
    assert total.spec_method == "ngram"
