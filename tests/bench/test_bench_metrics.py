"""Metric arithmetic against hand-computed cases."""
from __future__ import annotations

import pytest

from punctual.bench.loadgen import LoadResult, RequestRecord
from punctual.bench.metrics import (SLO, distribution_ms, fluidity_index, meets_slo, percentile, slo_attainment,
                                    summarize, token_deadlines_met)
from punctual.bench.report import per_user_table
from punctual.bench.sweep import bisect_goodput, goodput_from_points, goodputs


def record(token_times, *, usage=None, e2e=None, error=None, user=None, output_len=None):
    r = RequestRecord(0, prompt_len=10, output_len=output_len or len(token_times), user=user,
                      ttft_s=token_times[0] if token_times else None,
                      e2e_s=e2e if e2e is not None else (token_times[-1] if token_times else None),
                      token_times_s=list(token_times), usage_output_tokens=usage, error=error)
    return r


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]            # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5     # halfway between ranks 1 and 2
    assert percentile(values, 90) == pytest.approx(3.7)   # position 2.7
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_in_milliseconds():
    stats = distribution_ms([0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(200.0)
    assert stats["median"] == pytest.approx(200.0)
    assert stats["p90"] == pytest.approx(280.0)
    assert stats["count"] == 3
    assert distribution_ms([]) is None


def test_distribution_ranks_unsorted_values_as_percentile_does():
    values = [0.3, 0.01, 0.25, 0.7, 0.02, 0.5, 0.11]
    stats = distribution_ms(values)
    ms = [v * 1000 for v in values]
    assert (stats["median"], stats["p90"], stats["p99"]) == (percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))
    assert stats["mean"] == sum(ms) / len(ms) and values[0] == 0.3  # the caller's list is left as it was


def test_tpot_and_itl_from_token_times():
    r = record([0.5, 0.6, 0.8, 1.1], e2e=1.1)
    assert r.tpot_s == pytest.approx((1.1 - 0.5) / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.3])
    # usage counts tokens the chunks coalesced: 7 tokens in 4 chunks
    r = record([0.5, 0.6, 0.8, 1.1], usage=7, e2e=1.1)
    assert r.output_tokens == 7
    assert r.tpot_s == pytest.approx(0.6 / 6)
    assert record([0.5]).tpot_s is None                   # one token: no TPOT
    assert record([0.5, 0.6], error="HTTP 500").tpot_s is None


def test_slo_attainment_counts_failures_and_one_token_answers():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    fast = record([0.2, 0.25, 0.3])                       # TTFT 0.2, TPOT 0.05
    slow_first = record([1.5, 1.55])                      # TTFT misses
    slow_decode = record([0.2, 0.5, 0.8])                 # TPOT 0.3 misses
    one_token = record([0.9])                             # no TPOT: judged on TTFT
    failed = record([], error="HTTP 500", output_len=5)
    assert [meets_slo(r, slo) for r in (fast, slow_first, slow_decode, one_token, failed)] == \
        [True, False, False, True, False]
    assert slo_attainment([fast, slow_first, slow_decode, one_token, failed], slo) == pytest.approx(2 / 5)


def test_fluidity_carries_slack_and_restarts_after_a_miss():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    # Early first token banks slack: deadlines 1.0, 1.1, 1.2, 1.3; a 0.5 s gap after a fast start is fine.
    assert token_deadlines_met([0.2, 0.7, 1.15, 1.25], slo) == 4
    # A stall: deadlines 1.0, 1.1 (met), 1.2 missed at 1.6, then the schedule restarts: 1.7, 1.8.
    assert token_deadlines_met([0.9, 1.0, 1.6, 1.65, 1.8], slo) == 4
    # Each miss restarts the schedule from the late token: 1.6 misses (1.2), 1.75 misses (1.7), 1.9 misses (1.85).
    assert token_deadlines_met([0.9, 1.0, 1.6, 1.75, 1.9], slo) == 2
    # A late first token restarts the schedule from it.
    assert token_deadlines_met([2.0, 2.1, 2.2], slo) == 2


def test_fluidity_index_pools_tokens_and_charges_failures():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    good = record([0.5, 0.6])                             # 2 of 2
    late = record([2.0, 2.1, 2.2])                        # 2 of 3
    failed = record([], error="boom", output_len=5)       # 0 of 5
    assert fluidity_index([good, late, failed], slo) == pytest.approx(4 / 10)


def test_summarize_throughput_and_per_user():
    records = [record([0.1, 0.2, 0.3], user="a"), record([0.2, 0.4], user="b"),
               record([], error="HTTP 429: busy", user="b", output_len=4)]
    summary = summarize(LoadResult(records, duration_s=2.0), SLO(1.0, 0.15))
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_throughput"] == pytest.approx(5 / 2)
    assert summary["ttft_ms"]["median"] == pytest.approx(150.0)
    assert summary["slo"]["attainment"] == pytest.approx(1 / 3)   # b's TPOT 0.2 misses, the failure misses
    assert summary["slo"]["good_request_throughput"] == pytest.approx(0.5)
    assert summary["per_user"]["b"]["requests"] == 2
    assert summary["per_user"]["a"]["attainment"] == 1.0
    assert summary["errors"] == ["HTTP 429: busy"]
    assert per_user_table(summary).splitlines()[-1].split()[:2] == ["b", "1/2"]


def test_goodput_from_a_rate_sweep():
    points = [(0.5, 1.0), (1.0, 0.97), (2.0, 0.91), (4.0, 0.6), (8.0, 0.95)]
    assert goodput_from_points(points) == 2.0             # the pass at 8 after a failure is noise
    assert goodput_from_points(points, target=0.95) == 1.0
    assert goodput_from_points([(1.0, 0.5)]) is None


def test_goodput_bisection_finds_the_crossing_of_a_synthetic_curve():
    capacity = 3.3
    curve = lambda rate: 1.0 if rate <= capacity else max(0.0, 1 - (rate - capacity))  # noqa: E731
    # crossing at 0.9: rate 3.4
    goodput, points = bisect_goodput(curve, 1.0, 8.0, steps=8)
    assert 3.3 <= goodput <= 3.4
    assert points[:2] == [(1.0, 1.0), (8.0, 0.0)]
    assert len(points) == 10
    assert bisect_goodput(curve, 5.0, 8.0)[0] is None      # the low end already fails
    assert bisect_goodput(curve, 1.0, 2.0)[0] == 2.0        # the high end passes


def test_goodputs_groups_runs_by_system_and_workload():
    def run(system, rate, attainment):
        return {"system": system, "workload": "chat", "rate": rate, "summary": {"slo": {"attainment": attainment}}}
    runs = [run("a", 1, 1.0), run("a", 2, 0.95), run("a", 4, 0.5), run("b", 1, 0.8), run("b", 2, 0.2)]
    assert goodputs(runs) == {"a": {"chat": {"goodput": 2, "rates": [1, 2, 4]}},
                              "b": {"chat": {"goodput": None, "rates": [1, 2]}}}
