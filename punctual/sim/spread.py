"""How much a real server's steps and front end vary around what its profile prices.

A profile's fit gives the mean: the simulator that charged only that ran every step in the
same time, so its tails were too short. On a quiet smollm2 validation (2026-12-02) every TTFT
p90 came out early, by 12-36%, while the p50s were within 10%: the slowest first tokens had
waited 10-40 ms in the front end before the core saw them (the profile's median: 1.5 ms) or
ran a prompt step 20-40% over its fit.

`calibrate --server` keeps two distributions from the server's own trace, as quantile tables
(QUANTILES points from the 0th to the 100th percentile):
  step_ratio  each traced step's time over the fitted profile's price for it, scaled to average
              what the steps cost over their price (`with_mean`: the fit prices the mean, the
              table only the scatter)
  admit_s     the front end's delay (HTTP arrival -> the core has the request) of requests that
              found the core between steps (one that arrives mid-step also waits for that step,
              which the simulator charges itself)
and the simulator draws from them: each step's price times a ratio from its replica's own
stream (seeded by the replica's id, so a replica's steps draw the same ratios whichever other
replicas share its process: `sim run --sim-processes` gives the one-process answer), each
request's admit delay from a hash of its run and index. Same seed and workload, same answers.
A spread seed (`Simulator(spread_seed=...)`) selects another set of draws: `sim validate
--sim-repeats` runs each point under several and reports the median, because a p90 over a few
dozen requests drawn once moves by a fifth from one set of draws to the next.

Pure Python: the simulator's run path imports no numpy or torch.
"""
from __future__ import annotations

import random

QUANTILES = 21  # 0%, 5%, ..., 100%
MIN_SAMPLES = 20  # fewer than this: no table (a tail needs samples to be one)


def quantile_table(samples: list[float], points: int = QUANTILES) -> list[float] | None:
    """`points` evenly spaced quantiles of `samples` (linear between order statistics), or None
    with fewer than MIN_SAMPLES samples."""
    if len(samples) < MIN_SAMPLES:
        return None
    ordered = sorted(samples)  # every sample a quantile table point: draw interpolates between them
    return [draw(ordered, i / (points - 1)) for i in range(points)]


def draw_mean(table: list[float]) -> float:
    """The mean of `draw(table, u)` over u uniform in [0, 1): the trapezoids between its points."""
    return (table[0] / 2 + sum(table[1:-1]) + table[-1] / 2) / (len(table) - 1)


def with_mean(table: list[float] | None, mean: float = 1.0) -> list[float] | None:
    """A ratio table scaled so that its draws average `mean`: the fit sets a step's mean price,
    the spread only how steps scatter around it (unscaled, quiet smollm2 profiles' step-ratio
    tables averaged 1.02-1.06, so the simulator charged every step that much over its fit)."""
    if table is None:
        return None
    current = draw_mean(table)
    return [value * mean / current for value in table] if current > 0 else table


def draw(table: list[float], u: float) -> float:
    """The value at quantile u (in [0, 1)) of a quantile table, linear between its points."""
    position = u * (len(table) - 1)
    low = int(position)
    if low >= len(table) - 1:
        return table[-1]
    return table[low] + (table[low + 1] - table[low]) * (position - low)


def uniform(key: int) -> float:
    """A uniform number in [0, 1) from an integer key (splitmix64's finaliser): the same key, the
    same number, in any process."""
    z = (key * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def request_key(run_id: int, index: int, seed: int = 0) -> int:
    """A request's key for its admit draw: its run, its index in the run's workload, the spread seed."""
    return (seed << 40) + run_id * 1_000_003 + index


def step_stream(replica_id: int, seed: int = 0) -> random.Random:
    """A replica's stream of step-ratio draws (its own, whatever else runs in the process)."""
    return random.Random(0x5EED_0000 + replica_id + (seed << 32))
