"""Greedy tokens equal transformers' generate, whatever the batching, chunking or preemption did."""
from __future__ import annotations

import random

import pytest

from hf_models import ARCHS, VOCAB, hf_greedy
from punctual import LLM, SamplingParams

MAX_NEW = 12


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 70))] for _ in range(count)]


PROMPTS = make_prompts(16)


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: hf_greedy(checkpoints[name], PROMPTS, MAX_NEW) for name in ARCHS}


def run(path, prompts, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.core.check_integrity()
    assert llm.engine.stats().kv_blocks_used == 0
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_request_at_a_time(arch, checkpoints, references):
    llm = LLM(str(checkpoints[arch]), num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for prompt, expected in zip(PROMPTS[:6], references[arch][:6]):
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sixteen_at_once(arch, checkpoints, references):
    got, _ = run(checkpoints[arch], PROMPTS, num_kv_blocks=256, max_num_batched_tokens=2048)
    assert got == references[arch]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chunked_prefill_smaller_than_prompts(arch, checkpoints, references):
    # A budget of 7 tokens: every prompt longer than 7 is prefilled in several chunks,
    # mixed in the same steps with other requests' decodes.
    got, llm = run(checkpoints[arch], PROMPTS, num_kv_blocks=256, max_num_batched_tokens=7, block_size=4)
    assert got == references[arch]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_preemption_under_tiny_kv_pool(arch, checkpoints, references):
    # 24 blocks of 4 tokens: the longest request needs 21 blocks, so requests must yield memory.
    got, llm = run(checkpoints[arch], PROMPTS, num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)
    assert llm.engine.stats().num_preemptions > 0
    assert got == references[arch]


def test_builtin_tiny_loads_in_transformers_with_same_greedy_tokens():
    from punctual.checkpoints.builtin import builtin_path

    path = builtin_path("builtin-tiny")
    prompts = make_prompts(3, seed=1)
    expected = hf_greedy(path, prompts, MAX_NEW)
    got, _ = run(path, prompts, num_kv_blocks=64)
    assert got == expected


@pytest.mark.parametrize("policy", ["priority", "slo", "sjf", "fair"])
def test_every_policy_changes_when_never_what(policy, checkpoints, references):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=40, block_size=4, max_num_batched_tokens=24,
              scheduling_policy=policy, default_tpot_slo_ms=10_000)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        llm.engine.add_request(str(i), {"prompt_token_ids": prompt}, params, priority=i % 3,
                               user=f"user{i % 4}", ttft_slo_ms=600_000)
    finished = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert [finished[str(i)].token_ids for i in range(len(PROMPTS))] == references["llama_gqa"]
    assert all(finished[str(i)].metrics["ttft_slo_met"] for i in range(len(PROMPTS)))
    llm.engine.core.check_integrity()


def test_long_prompt_arriving_during_decodes_does_not_stall_them(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, max_num_batched_tokens=16)
    engine, core = llm.engine, llm.engine.core
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"d{i}", {"prompt_token_ids": PROMPTS[i][:8]}, params)
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        engine.step()
    engine.add_request("long", {"prompt_token_ids": PROMPTS[0] * 4}, params)
    plans = []
    original = core.scheduler.schedule

    def recording(now, spec_available=None):
        plan = original(now, spec_available)
        plans.append(plan)
        return plan

    core.scheduler.schedule = recording
    for _ in range(8):
        engine.step()
    for plan in plans:
        by_id = {s.request_id: s.num_new_tokens for s in plan.scheduled}
        assert all(by_id[f"d{i}"] == 1 for i in range(4)), by_id
        assert plan.num_batched_tokens <= 16
    assert any(by_id.get("long", 0) == 12 for by_id in
               ({s.request_id: s.num_new_tokens for s in p.scheduled} for p in plans))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_cache_hits_and_speculation(arch, checkpoints, references):
    # The same prompts twice: the second pass reads its prefixes from the cache (with every
    # architecture's KV layout and window), and prompt-lookup proposals are verified in batches.
    prompts = PROMPTS[:8]
    llm = LLM(str(checkpoints[arch]), num_kv_blocks=256, block_size=4, max_num_batched_tokens=64,
              speculative_method="ngram", num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for _ in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == references[arch][:8]
    assert llm.engine.stats().prefix_cache_hits > 0
    llm.engine.core.check_integrity()
