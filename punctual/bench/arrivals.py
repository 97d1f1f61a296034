"""Arrival processes: when each request of an open-loop run is sent.

An open-loop generator sends on a schedule regardless of how fast the server answers, so a
slow server sees its queue grow, as it would in production; a closed loop (a fixed number of
clients, each waiting for its answer before sending again) hides overload by slowing down.
Closed loops are run by the load generator with `concurrency`; this module makes schedules.

Inter-arrival gaps are gamma distributed with mean 1/rate and shape 1/burstiness, so
`burstiness` is the squared coefficient of variation of the gaps: 1 gives exponential gaps (a
Poisson process), above 1 requests come in clumps with lulls between, below 1 they come more
evenly, and 0 gives a fixed interval. (vLLM's `--burstiness` is the gamma shape itself, the
inverse of this one: our 2 is their 0.5.)
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start, for `num_requests` requests at `rate` per second.

    The first request goes at 0. A rate of infinity sends everything at once. The same seed
    gives the same pattern at every rate, only stretched, so a rate sweep compares like with
    like.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests: must be at least 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"request_rate: must be positive, got {rate}")
    if burstiness < 0:
        raise ValueError(f"burstiness: must be at least 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    gaps = unit_gaps(num_requests - 1, burstiness, seed) / rate
    return [0.0] + np.cumsum(gaps).tolist()


def unit_gaps(count: int, burstiness: float, seed: int) -> np.ndarray:
    """`count` gaps with mean 1 and squared coefficient of variation `burstiness`."""
    if burstiness == 0:
        return np.ones(count)
    rng = np.random.default_rng([seed, 0xA221])  # apart from the workload's stream of the same seed
    shape = 1.0 / burstiness
    return rng.gamma(shape, scale=1.0 / shape, size=count)  # mean shape * scale = 1, variance 1 / shape
