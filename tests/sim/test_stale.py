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
