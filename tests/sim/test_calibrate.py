"""`punctual sim calibrate` on the real runner: its grid times prompt steps after a cached prefix."""
from __future__ import annotations

import pytest

from punctual.sim.calibrate import calibrate

pytestmark = pytest.mark.slow  # a full calibration grid on the real runner, twice


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_calibration_times_suffixes_after_a_cached_prefix(prefix_caching):
    """With the cache on (as a server runs), the grid times three suffixes after a cached
    256-token prefix: steps whose prompt work starts deep in a context, what a shared document's
    questions cost; with it off there are none, and nothing else in the grid starts late (the
    token budget takes every prompt whole)."""
    profile = calibrate("builtin", {"kv_cache_memory": "64MiB", "max_num_batched_tokens": 2048,
                                    "enable_prefix_caching": prefix_caching},
                        max_prompt=320, max_batch=2, log=lambda _: None)
    assert profile.fit["num_prefix_hit_steps"] == (3 if prefix_caching else 0)
    assert profile.engine["enable_prefix_caching"] is prefix_caching
    assert profile.predict((1.0, 24.0, 0.0, 280.0, 24 * 256 + 300, 1.0)) > 0
