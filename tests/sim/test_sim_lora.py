"""LoRA in the simulator: slots and the loaded set priced per step, adapters drawn per request,
and the router's adapter affinity seen in the swaps it saves."""
from __future__ import annotations

import pytest

from punctual.config import ClusterConfig, SchedulerConfig
from punctual.sim.engine import SimConfig, SimRequest, Simulator
from punctual.sim.lora import SimLoRA, zipf_adapters
from punctual.sim.profile import StepProfile

COEFFICIENTS = {"fixed": 0.02, "prefill_tokens": 4e-4, "decode_rows": 6e-4, "context_tokens": 1e-6,
                "attention_pairs": 2e-8, "sampled_rows": 1e-4}


def simulate(adapters: list[int | None], lora: SimLoRA, replicas: int = 1, router: str = "cache_aware",
             gap_s: float = 0.0):
    sim = Simulator(SimConfig(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256), 400,
                              cluster=ClusterConfig(replicas=replicas, router=router), lora=lora),
                    StepProfile("linear", dict(COEFFICIENTS)))
    requests = [SimRequest(i, tuple(range(1000 * i, 1000 * i + 24)), 8, adapter=a) for i, a in enumerate(adapters)]
    outcomes, _ = sim.run(requests, offsets=[i * gap_s for i in range(len(requests))])
    assert all(o.error is None for o in outcomes)
    ttft = sum(o.token_times[0] - o.sent for o in outcomes) / len(outcomes)
    for replica in sim.replicas:
        replica.scheduler.check_integrity()
    return sim, ttft


def test_more_adapters_than_slots_swap_and_wait():
    lora = SimLoRA(max_loras=2, max_cpu_loras=2, load_s=0.05, swap_s=0.01)
    one_sim, one_ttft = simulate([0] * 16, lora)
    many_sim, many_ttft = simulate([i % 8 for i in range(16)], lora)
    one, many = one_sim.replicas[0], many_sim.replicas[0]
    assert one.scheduler.num_lora_swaps == 0 and one.lora.num_disk_loads == 1
    assert many.scheduler.num_lora_swaps > 0 and many.lora.num_disk_loads >= 8  # each read, two kept
    assert many_ttft > one_ttft


def test_loads_cost_time_and_the_base_model_pays_nothing():
    free = SimLoRA(max_loras=4, load_s=0.0, swap_s=0.0, group_s=0.0)
    _, base_ttft = simulate([None] * 8, free)
    _, free_ttft = simulate([i % 4 for i in range(8)], free)
    _, paid_ttft = simulate([i % 4 for i in range(8)], SimLoRA(max_loras=4, load_s=0.2))
    assert free_ttft == pytest.approx(base_ttft)  # adapters at no cost: the same schedule
    assert paid_ttft > free_ttft + 0.2  # every request waits for at least one read from disk


def test_affinity_saves_swaps_over_round_robin():
    """Two replicas of one slot each, two adapters: the router keeps each adapter on the replica
    that holds it, where round robin makes both replicas swap back and forth."""
    lora = SimLoRA(max_loras=1, max_cpu_loras=1)
    adapters = [(i // 2) % 2 for i in range(24)]  # 0 0 1 1 0 0 ...: round robin sends each to both
    swaps = {}
    for router in ("cache_aware", "round_robin"):
        sim, _ = simulate(adapters, lora, replicas=2,
                          router=router, gap_s=0.05)
        swaps[router] = sum(r.lora.num_swaps_in for r in sim.replicas)
    assert swaps["cache_aware"] < swaps["round_robin"]


def test_zipf_popularity_and_bad_settings():
    draws = zipf_adapters(2000, 8, exponent=1.2, seed=3)
    counts = [draws.count(k) for k in range(8)]
    assert counts[0] > counts[3] > counts[7] > 0
    assert zipf_adapters(50, 8, seed=3) == zipf_adapters(50, 8, seed=3)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        SimLoRA(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="no LoRA"):
        Simulator(SimConfig(SchedulerConfig(), 100), StepProfile("linear", dict(COEFFICIENTS))).run(
            [SimRequest(0, (1, 2, 3), 2, adapter=0)], offsets=[0.0])


def test_sim_run_flags_spread_requests_over_adapters(tmp_path, capsys):
    """`punctual sim run --num-adapters`: more adapters than slots take longer than one adapter."""
    import json

    from punctual.cli import main

    path = tmp_path / "profile.json"
    StepProfile("linear", dict(COEFFICIENTS), model={"name": "t", "max_model_len": 1024,
                                                     "kv_bytes_per_token": 1000}, num_kv_blocks=400).save(path)
    ttft = {}
    for adapters in (1, 16):
        out = tmp_path / f"{adapters}.json"
        assert main(["sim", "run", "--profile", str(path), "--num-requests", "24", "--length-scale", "0.1",
                     "--concurrency", "8", "--output", str(out), "--no-progress", "--num-adapters", str(adapters),
                     "--max-loras", "2", "--lora-load-ms", "50"]) == 0
        ttft[adapters] = json.loads(out.read_text())["runs"][0]["summary"]["ttft_ms"]["mean"]
    assert ttft[16] > ttft[1]  # swaps and reads from disk delay first tokens
    capsys.readouterr()
    assert main(["sim", "run", "--profile", str(path), "--num-requests", "4", "--max-loras", "2",
                 "--no-progress"]) != 0
    assert "--max-loras" in capsys.readouterr().err
