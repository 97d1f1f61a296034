"""Shards under a router fed replica state a window late (sim/stale.py): with staleness 0 they
answer exactly as one process; with a window, within a stated tolerance of it."""
from __future__ import annotations

import pytest

from punctual.bench.metrics import summarize
from punctual.bench.workloads import generate_workload
from punctual.config import ClusterConfig, SchedulerConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import SimSender
from punctual.sim.spread import quantile_table
from punctual.sim.stale import StaleRouterSimulator, window_start
from tests.sim.test_sim import profile


def _config(router: str, replicas: int = 4) -> SimConfig:
    return SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), 120, max_model_len=2048,
                     cluster=ClusterConfig(replicas=replicas, router=router))


def _runs(simulator, requests, offsets, runs: int = 2):
    """Two runs on the same simulator (the second starts from the first's clock and caches)."""
    sender = SimSender(simulator)
    answers = [sender(None, requests, offsets=offsets) for _ in range(runs)]
    if isinstance(simulator, StaleRouterSimulator):
        simulator.close()
    return answers, simulator.now, simulator.num_steps


@pytest.mark.parametrize("router", ["cache_aware", "least_loaded"])
@pytest.mark.parametrize("spread", [False, True])
def test_staleness_zero_equals_one_process(router, spread):
    """Every record (each token's time, its replica's timing), the clock and the step count as in
    one process: the router decides each instant's arrivals on the state one process shows it."""
    tables = {"step_ratio": quantile_table([0.8, 1.0, 1.3] * 10),
              "admit_s": quantile_table([0.001, 0.02] * 15)} if spread else {}
    requests = generate_workload("shared-prefix", 60, 3, 0.2)
    offsets = [i * 0.004 for i in range(len(requests))]
    offsets[5] = offsets[4]  # two arrivals at one instant
    one = _runs(Simulator(_config(router), profile(spread=tables or None)), requests, offsets)
    split = _runs(StaleRouterSimulator(_config(router), profile(spread=tables or None), 2, 0.0), requests, offsets)
    assert all(r.error is None for r in one[0][0].records)
    assert split == one


def test_window_start_bounds_the_staleness():
    assert window_start(0.0123, 0.01) == pytest.approx(0.01)
    assert window_start(0.0123, 0.0) == 0.0123
    for t in (0.3, 0.7, 1.1, 123.456):
        assert t - 0.1 < window_start(t, 0.1) <= t


@pytest.mark.parametrize("router", ["cache_aware", "least_loaded"])
def test_a_window_late_stays_close_to_one_process(router):
    """With a 20 ms window (a few steps of this profile's 20-30 ms) on 6 replicas at ~70% load,
    the output throughput and the TTFT and E2E medians and p90s stay within 10% of one process's
    (the stated tolerance; measured here: at most 6.7%): decisions on state at most 20 ms old
    move some requests, not the distribution."""
    requests = generate_workload("chat", 240, 0, 0.2)
    offsets = [i * 0.02 for i in range(len(requests))]
    summaries = []
    for simulator in (Simulator(_config(router, 6), profile()),
                      StaleRouterSimulator(_config(router, 6), profile(), 2, 0.02)):
        answers, _, _ = _runs(simulator, requests, offsets, runs=1)
        summaries.append(summarize(answers[0]))
    exact, late = summaries
    assert exact["completed"] == late["completed"] == len(requests)
    for metric in ("ttft_ms", "e2e_ms"):
        for stat in ("median", "p90"):
            assert late[metric][stat] == pytest.approx(exact[metric][stat], rel=0.10), (metric, stat)
    assert late["output_throughput"] == pytest.approx(exact["output_throughput"], rel=0.10)
    # and the decisions did differ (else this test compares a run with itself)
    assert late != exact


def test_pipelined_windows_read_state_within_the_staleness_and_repeat():
    """With staleness > 0 the router decides one window ahead of the shards: every decision reads
    state at most the staleness old (and at least half of it), and which state it reads does not
    depend on the processes' timing, so two runs answer alike."""
    requests = generate_workload("chat", 120, 1, 0.2)
    offsets = [i * 0.013 for i in range(len(requests))]
    offsets[40:] = [offsets[39] + 0.5 + i * 0.013 for i in range(len(requests) - 40)]  # a gap: a window of its own
    answers = []
    for _ in range(2):
        simulator = StaleRouterSimulator(_config("cache_aware", 4), profile(), 2, 0.02)
        answers.append(_runs(simulator, requests, offsets, runs=1))  # closes it
        assert 0.01 <= simulator.max_lateness_s <= 0.02
    assert all(r.error is None for r in answers[0][0][0].records)
    assert answers[0] == answers[1]


def test_window_start_survives_rounding():
    """0.06 / 0.02 rounds below 3: the window of 0.06 still starts at 0.06 and holds it."""
    for t in (0.06, 0.3, 0.7, 1.1, 0.1 * 3):
        b = window_start(t, 0.02)
        assert b <= t < b + 0.02


def test_sim_processes_flag():
    """auto: one per CPU on a big open-loop cluster, one process where requests couple replicas;
    a count must be a whole number >= 1."""
    import os

    from punctual.sim.cli import AUTO_MIN_CPUS, AUTO_MIN_REPLICAS, sim_processes

    big, small = _config("cache_aware", AUTO_MIN_REPLICAS), _config("cache_aware", AUTO_MIN_REPLICAS - 1)
    cpus = len(os.sched_getaffinity(0))
    assert sim_processes("auto", big, None, 0) == (cpus if cpus >= AUTO_MIN_CPUS else 1)
    assert sim_processes("auto", small, None, 0) == 1
    assert sim_processes("auto", big, 8, 0) == 1  # a closed loop
    assert sim_processes("auto", big, None, 4) == 1  # adapters
    assert sim_processes("3", small, None, 0) == 3
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="--sim-processes"):
            sim_processes(bad, big, None, 0)
