"""A profile's spread: real steps and admit delays vary around the fit, and the simulator draws
them, deterministically, so its tails are as long as the server's."""
from __future__ import annotations

import json
import statistics

import pytest

from punctual.bench.workloads import generate_workload
from punctual.config import SchedulerConfig
from punctual.sim.calibrate_server import fit_serving_profile
from punctual.config import ClusterConfig
from punctual.sim.engine import SimConfig, Simulator
from punctual.sim.loadgen import to_sim_requests
from punctual.sim.profile import StepProfile
from punctual.sim.spread import MIN_SAMPLES, draw, draw_mean, quantile_table, uniform
from punctual.sim.trace import ServerTrace

COEFFICIENTS = {"fixed": 0.01, "prefill_tokens": 2e-4, "decode_rows": 5e-4, "context_tokens": 1e-6,
                "attention_pairs": 1e-8, "sampled_rows": 1e-4}
STEP_RATIOS = [0.8] * 50 + [1.0] * 30 + [1.6] * 20  # mean 1.02: a fast majority, a slow fifth
ADMITS = [0.001] * 80 + [0.030] * 20


def spread_profile(**spread) -> StepProfile:
    return StepProfile("linear", dict(COEFFICIENTS), frontend={"admit_s": 0.001, "deliver_s": 0.003}, spread=spread)


def test_quantile_tables_and_draws():
    table = quantile_table([float(i) for i in range(101)])
    assert table == pytest.approx([5.0 * i for i in range(21)])
    assert (draw(table, 0.0), draw(table, 0.5), draw(table, 0.999)) == pytest.approx((0.0, 50.0, 99.9))
    assert quantile_table([1.0] * (MIN_SAMPLES - 1)) is None
    draws = [uniform(key) for key in range(20000)]
    assert all(0.0 <= u < 1.0 for u in draws) and statistics.fmean(draws) == pytest.approx(0.5, abs=0.01)
    assert uniform(12345) == uniform(12345) != uniform(12346)


def simulate(profile: StepProfile, seed: int = 4, spread_seed: int = 0):
    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256), 600), profile,
                    spread_seed=spread_seed)
    requests = to_sim_requests(generate_workload("chat", 120, seed, 0.2))
    outcomes, _ = sim.run(requests, offsets=[i * 0.15 for i in range(len(requests))])
    outcomes.sort(key=lambda o: o.request.index)
    ttfts = [o.token_times[0] - o.sent for o in outcomes]
    return outcomes, statistics.quantiles(ttfts, n=10)[-1], sum(r.busy_s for r in sim.replicas) / sim.num_steps


def test_spread_lengthens_the_tails_keeps_the_mean_and_repeats_exactly():
    plain_outcomes, plain_p90, plain_step = simulate(spread_profile())
    spread = {"step_ratio": quantile_table(STEP_RATIOS), "admit_s": quantile_table(ADMITS)}
    outcomes, p90, mean_step = simulate(spread_profile(**spread))
    assert p90 > plain_p90 + 0.010  # a fifth of the requests wait 30 ms in the front end
    assert mean_step == pytest.approx(plain_step, rel=0.08)  # the ratios' mean is ~1
    again, _, _ = simulate(spread_profile(**spread))
    assert [o.token_times for o in again] == [o.token_times for o in outcomes]  # deterministic
    assert [o.token_times for o in outcomes] != [o.token_times for o in plain_outcomes]
    # Only the admit spread: every step at its price, the arrivals shifted by their draws.
    admits_only, _, _ = simulate(spread_profile(admit_s=quantile_table(ADMITS)))
    shifts = {round(a.token_times[0] - a.sent - (p.token_times[0] - p.sent), 6)
              for a, p in zip(admits_only, plain_outcomes)}
    assert len(shifts) > 1


def test_spread_seeds_draw_other_sets_and_validate_takes_their_median():
    """`sim validate --sim-repeats`: each spread seed is another set of draws (the same seed, the
    same set), and a point's summary is the median of the sets' summaries, number by number."""
    from punctual.sim.validate import median_summary

    spread = {"step_ratio": quantile_table(STEP_RATIOS), "admit_s": quantile_table(ADMITS)}
    first, p90_first, _ = simulate(spread_profile(**spread), spread_seed=1)
    again, _, _ = simulate(spread_profile(**spread), spread_seed=1)
    other, p90_other, _ = simulate(spread_profile(**spread), spread_seed=2)
    assert [o.token_times for o in again] == [o.token_times for o in first]
    assert [o.token_times for o in other] != [o.token_times for o in first] and p90_other != p90_first
    summaries = [{"ttft_ms": {"p90": p90, "count": 120}, "errors": [str(p90)], "slo": {"attainment": a}}
                 for p90, a in ((70.0, 1.0), (50.0, 0.9), (61.0, 0.95))]
    assert median_summary(summaries) == {"ttft_ms": {"p90": 61.0, "count": 120}, "errors": ["70.0"],
                                         "slo": {"attainment": 0.95}}


def test_calibration_keeps_the_spread_of_its_trace(tmp_path):
    """fit_serving_profile: quantiles of every traced step over the fitted price (outliers the fit
    left out included) and of the between-steps admit delays; saved and loaded with the profile."""
    base = StepProfile("linear", dict(COEFFICIENTS))
    shapes = [(0.0, 4.0, 400.0), (64.0, 2.0, 300.0), (0.0, 8.0, 900.0), (128.0, 0.0, 128.0), (0.0, 16.0, 2000.0)]
    rows = [(1.0, p, d, c, 2 * c, d + (p > 0)) for p, d, c in shapes] * 12
    factors = [1.0, 1.0, 1.0, 0.9, 1.1, 3.0] * 10  # one step in six three times its cost
    seconds = [base.predict(x) * f for x, f in zip(rows, factors)]
    adds = [{"add": f"r{i}", "arrival": float(i), "received": i + a, "mid_step": False}
            for i, a in enumerate([0.001] * 20 + [0.05] * 5)]
    adds.append({"add": "late", "arrival": 100.0, "received": 100.5, "mid_step": True})  # waited for a step
    trace = ServerTrace(rows, seconds, adds, first_token_sent={})
    profile = fit_serving_profile(base, trace, [(1.0, 0.003)] * 5, {})
    ratios = profile.step_ratios
    table = quantile_table([s / profile.predict(x) for x, s in zip(rows, seconds)])
    # the table's shape, its draws averaging what the steps cost over their price in the mean a
    # TPOT takes (streams-weighted): the fit already prices that mean, so the draws must not add to it
    overall = (sum(max(1, x[5]) * s for x, s in zip(rows, seconds))
               / sum(max(1, x[5]) * profile.predict(x) for x in rows))
    assert ratios == pytest.approx([r * overall / draw_mean(table) for r in table])
    assert draw_mean(ratios) == pytest.approx(overall) and draw_mean(table) != pytest.approx(overall, rel=1e-3)
    assert len(ratios) == 21 and ratios[-1] / ratios[10] > 2.5  # the slow sixth is in the tail
    assert profile.admit_quantiles[0] == pytest.approx(0.001) and profile.admit_quantiles[-1] == pytest.approx(0.05)
    profile.save(tmp_path / "p.json")
    loaded = StepProfile.from_json(json.loads((tmp_path / "p.json").read_text()))
    assert loaded.spread == profile.spread and loaded.scaled(2.0).spread == profile.spread
    few = fit_serving_profile(base, ServerTrace(rows, seconds, adds[:3], first_token_sent={}), [(1.0, 0.003)], {})
    assert few.admit_quantiles is None and few.step_ratios is not None  # too few admits for a tail
