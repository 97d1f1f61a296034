"""Speculative decoding: greedy output unchanged, sampling exact in distribution, blocks returned."""
from __future__ import annotations

import random

import pytest
import torch

from hf_models import VOCAB, hf_greedy
from punctual import LLM, SamplingParams
from punctual.runner.sampler import Sampler
from punctual.request import EngineCoreRequest, Request
from punctual.sched.cost_model import StepCostModel
from punctual.spec_decode.length import choose_lengths
from punctual.spec_decode.ngram import NgramProposer

MAX_NEW = 16


def repetitive_prompts() -> list[list[int]]:
    rng = random.Random(5)
    pattern = [rng.randrange(VOCAB) for _ in range(7)]
    prompts = [pattern * 6, (pattern * 4)[3:], [rng.randrange(VOCAB) for _ in range(25)]]
    prompts += [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(5)]
    return prompts


@pytest.fixture(scope="module")
def reference(checkpoints):
    return hf_greedy(checkpoints["llama_gqa"], repetitive_prompts(), MAX_NEW)


@pytest.mark.parametrize("length", ["fixed", "adaptive"])
@pytest.mark.parametrize("engine_args", [
    dict(num_kv_blocks=256, max_num_batched_tokens=512),
    dict(num_kv_blocks=256, max_num_batched_tokens=9, block_size=4),  # chunked prefill, clipped proposals
    dict(num_kv_blocks=36, max_num_batched_tokens=64, block_size=4),  # preemption
], ids=["batched", "chunked", "preempting"])
def test_greedy_identical_with_speculation(checkpoints, reference, length, engine_args):
    llm = LLM(str(checkpoints["llama_gqa"]), speculative_method="ngram", num_speculative_tokens=4,
              speculative_length=length, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    core = llm.engine.core
    core.check_integrity()
    assert llm.engine.stats().kv_blocks_used == 0
    assert not core.speculator.proposer.indexes, "finished requests keep no n-gram index"
    if length == "fixed":
        assert core.speculator.stats.num_proposed_tokens > 0
    if engine_args["num_kv_blocks"] == 36:
        assert llm.engine.stats().num_preemptions > 0


@pytest.mark.parametrize("draft", ["self", "other"])
@pytest.mark.parametrize("length", ["fixed", "adaptive"])
@pytest.mark.parametrize("engine_args", [
    dict(num_kv_blocks=256, max_num_batched_tokens=512),
    dict(num_kv_blocks=256, max_num_batched_tokens=9, block_size=4),  # chunked prefill, clipped proposals
    dict(num_kv_blocks=36, max_num_batched_tokens=64, block_size=4),  # preemption
], ids=["batched", "chunked", "preempting"])
def test_greedy_identical_with_draft_model(checkpoints, reference, draft, length, engine_args):
    """A draft model (the target itself: every proposal right; another model: most wrong) never
    changes greedy output, and its own KV blocks all come back."""
    draft_path = checkpoints["llama_gqa" if draft == "self" else "llama_mqa_untied"]
    llm = LLM(str(checkpoints["llama_gqa"]), speculative_method="draft", speculative_model=str(draft_path),
              num_speculative_tokens=3, speculative_length=length, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    core = llm.engine.core
    core.check_integrity()
    assert llm.engine.stats().kv_blocks_used == 0
    proposer = core.speculator.proposer
    assert not proposer.states and proposer.num_free_blocks == proposer.runner.num_blocks
    stats = core.speculator.stats
    if length == "fixed":
        assert stats.num_proposed_tokens > 0
        if draft == "self":
            # Same weights: a wrong proposal would mean the draft's cache or rollback is stale.
            assert stats.acceptance_rate > 0.99, stats
    if engine_args["num_kv_blocks"] == 36:
        assert llm.engine.stats().num_preemptions > 0


def test_draft_model_sampling_hands_its_distribution_to_the_verifier(checkpoints):
    """Draft = target at temperature 1: q equals p, so min(1, p/q) accepts every proposal. A q
    that belonged to another position or request would reject often."""
    path = str(checkpoints["llama_gqa"])
    llm = LLM(path, speculative_method="draft", speculative_model=path, num_speculative_tokens=4, num_kv_blocks=256)
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=20, ignore_eos=True, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    stats = llm.engine.core.speculator.stats
    assert stats.num_proposed_tokens > 50 and stats.acceptance_rate > 0.97, stats


def test_draft_model_must_share_the_vocabulary(tmp_path):
    from punctual.checkpoints.builtin import write_checkpoint

    write_checkpoint(tmp_path, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=1024, max_position_embeddings=256,
                     tie_word_embeddings=True, dtype="float32")
    with pytest.raises(ValueError, match="vocabulary"):
        LLM("builtin-tiny", speculative_method="draft", speculative_model=str(tmp_path), num_kv_blocks=64)
    with pytest.raises(ValueError, match="speculative_model"):
        LLM("builtin-tiny", speculative_method="draft")


def test_fixed_speculation_accepts_on_repetitive_text(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), speculative_method="ngram", num_speculative_tokens=4,
              num_kv_blocks=256)
    # Greedy on a random model falls into loops, which prompt lookup then predicts.
    llm.generate({"prompt_token_ids": repetitive_prompts()[0]},
                 SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.core.speculator.stats
    assert stats.num_accepted_tokens > 0 and stats.mean_acceptance_length > 1.0
    assert llm.engine.stats().generation_tokens == 64


def test_verification_is_exact_in_distribution():
    """Chi-square: the first token out of verification follows the target distribution, whatever the draft."""
    torch.manual_seed(0)
    vocab = 5
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    target = torch.softmax(logits[0] / 0.8, dim=-1)
    sampler = Sampler(torch.device("cpu"), seed=1)
    draws = 20000
    for draft in (3, 2):  # a likely and an unlikely proposal
        request = Request(EngineCoreRequest("r", [1], SamplingParams(temperature=0.8, max_tokens=4)), 100)
        counts = torch.zeros(vocab)
        for _ in range(draws):
            tokens, _ = sampler.verify(logits, request, [draft])
            counts[tokens[0]] += 1
        expected = target * draws
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.47, (draft, counts, expected)  # df=4, p=0.001


def test_verification_with_a_draft_distribution_is_exact():
    """Chi-square: with a draft distribution q (accept min(1, p/q), else draw from max(0, p - q)),
    the first token follows p, for a q close to p and for one that favours unlikely tokens."""
    torch.manual_seed(0)
    vocab = 5
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    target = torch.softmax(logits[0], dim=-1)
    sampler = Sampler(torch.device("cpu"), seed=2)
    draws = 20000
    gen = torch.Generator().manual_seed(4)
    for q in (torch.tensor([0.2, 0.1, 0.05, 0.6, 0.05]), torch.tensor([0.05, 0.3, 0.5, 0.05, 0.1])):
        request = Request(EngineCoreRequest("r", [1], SamplingParams(temperature=1.0, max_tokens=4)), 100)
        counts = torch.zeros(vocab)
        for _ in range(draws):
            draft = int(torch.multinomial(q, 1, generator=gen))
            tokens, _ = sampler.verify(logits, request, [draft], q[None, :])
            counts[tokens[0]] += 1
        expected = target * draws
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.47, (q, counts, expected)  # df=4, p=0.001


def test_batched_verification_is_exact_for_every_request():
    """Several sampling requests verified in one call (one distribution call for all their rows):
    each one's first token follows its own target distribution, top-k included."""
    vocab = 5
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3],  # request a: rows 0-1
                           [0.5, 1.5, -1.0, 1.0, 0.0], [0.0] * 5, [0.0] * 5,       # request b: rows 2-4
                           [2.0, 0.0, 1.0, -1.0, 0.5], [0.0] * 5])                 # request c: rows 5-6
    params = {"a": SamplingParams(temperature=0.8, max_tokens=4),
              "b": SamplingParams(temperature=1.0, top_k=2, max_tokens=4),
              "c": SamplingParams(temperature=1.0, top_p=0.7, max_tokens=4, seed=11)}
    targets = {"a": torch.softmax(logits[0] / 0.8, dim=-1)}
    top2 = torch.full((vocab,), float("-inf"))
    top2[[1, 3]] = logits[2, [1, 3]]
    targets["b"] = torch.softmax(top2, dim=-1)
    probs_c = torch.softmax(logits[5], dim=-1)  # top-p 0.7 keeps tokens 0 and 2 (0.57 + 0.21)
    targets["c"] = torch.where(torch.tensor([True, False, True, False, False]), probs_c, 0) / probs_c[[0, 2]].sum()
    sampler = Sampler(torch.device("cpu"), seed=3)
    requests = {rid: Request(EngineCoreRequest(rid, [1], p), 100) for rid, p in params.items()}
    items = [(0, requests["a"], [3], None), (2, requests["b"], [2, 1], None), (5, requests["c"], [0], None)]
    counts = {rid: torch.zeros(vocab) for rid in params}
    draws = 12000
    for _ in range(draws):
        for (_, request, _, _), (tokens, _) in zip(items, sampler.verify_sampled(logits, items)):
            counts[request.request_id][tokens[0]] += 1
    for rid, target in targets.items():
        assert counts[rid][target == 0].sum() == 0, (rid, counts[rid])
        kept = target > 0
        expected = target[kept] * draws
        chi2 = float(((counts[rid][kept] - expected) ** 2 / expected).sum())
        assert chi2 < 18.47, (rid, counts[rid], expected)  # df <= 4, p=0.001


def test_verification_greedy_accepts_only_argmax_prefix():
    sampler = Sampler(torch.device("cpu"))
    request = Request(EngineCoreRequest("g", [1], SamplingParams(temperature=0, max_tokens=8)), 100)
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 4, 1, 5]):
        logits[row, best] = 1.0
    assert sampler.verify(logits, request, [2, 4, 1])[0] == [2, 4, 1, 5]  # all accepted + bonus
    assert sampler.verify(logits, request, [2, 3, 1])[0] == [2, 4]  # corrected at the first miss


def test_prompt_lookup_proposes_what_followed_the_last_match():
    proposer = NgramProposer(max_ngram=3)
    assert proposer.lookup([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    assert proposer.lookup([7, 8, 9], 3) == []
    assert proposer.lookup([1, 2, 1, 2, 1], 2) == [2, 1]


def test_prompt_lookup_continues_a_repeating_period():
    proposer = NgramProposer(max_ngram=3)
    # The latest match is 2 tokens back: the text repeats with period 2, so the proposal does too.
    assert proposer.lookup([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert proposer.lookup([4, 9, 5, 5, 5], 4) == [5, 5, 5, 5]
    # A match far enough back is copied as written.
    assert proposer.lookup([1, 2, 3, 4, 5, 6, 1, 2], 3) == [3, 4, 5]


def test_adaptive_length_switches_off_under_load_and_for_rejected_requests():
    cost = StepCostModel(fixed_s=0.030, per_token_s=0.004, per_seq_s=0.0)
    chosen = choose_lengths({"good": 4, "bad": 4}, {"good": 0.9, "bad": 0.05}, cost, base_tokens=2, num_seqs=2)
    assert chosen["good"] >= 3 and chosen["bad"] == 0
    # The same machine under load: a step already yields many tokens per second, so a proposal
    # that is accepted 90% of the time no longer pays for the time it adds to everyone's step.
    chosen = choose_lengths({"good": 4}, {"good": 0.9}, cost, base_tokens=128, num_seqs=128)
    assert chosen["good"] == 0


def test_prompt_lookup_index_finds_what_a_scan_finds():
    """The per-request index, updated as tokens are appended, proposes exactly what scanning the
    whole list right to left for the latest match proposes."""

    def scan(tokens: list[int], k: int, max_n: int = 3) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), 0, -1):
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tokens[len(tokens) - n:]:
                    follow = tokens[start + n:start + n + k]
                    return [follow[i % len(follow)] for i in range(k)]
        return []

    rng = random.Random(1)
    proposer = NgramProposer(max_ngram=3)
    for trial in range(20):
        tokens = [rng.randrange(4) for _ in range(3)]
        for _ in range(60):
            k = rng.randrange(1, 6)
            assert proposer.lookup(tokens, k, f"r{trial}") == scan(tokens, k), tokens
            tokens.extend(rng.randrange(4) for _ in range(rng.randrange(1, 4)))
        proposer.forget(f"r{trial}")
    assert not proposer.indexes


def test_a_new_request_starts_from_the_engine_wide_acceptance():
    from punctual.spec_decode.length import AcceptanceTracker

    tracker = AcceptanceTracker(prior=0.6)
    assert tracker.rate("new") == 0.6
    for i in range(100):  # a draft that is almost never right, over many requests
        tracker.observe(f"r{i}", proposed=4, accepted=0)
    cost = StepCostModel(fixed_s=0.020, per_token_s=0.0005, per_seq_s=0.0)
    assert tracker.rate("new") < 0.05
    # So a fresh request does not pay for drafts that the engine has learned are wasted.
    assert choose_lengths({"new": 4}, {"new": tracker.rate("new")}, cost, base_tokens=1, num_seqs=1,
                          depth_cost_s=0.005)["new"] == 0
    for i in range(100):
        tracker.observe(f"s{i}", proposed=4, accepted=4)
    assert tracker.rate("fresh") > 0.9


def test_adaptive_length_counts_a_prompt_chunk_as_work_and_never_displaces_it():
    cost = StepCostModel(fixed_s=0.020, per_token_s=0.0005, per_seq_s=0.0)
    alone = choose_lengths({"r": 4}, {"r": 0.7}, cost, base_tokens=4, num_seqs=4)
    assert alone["r"] >= 2
    # The same decodes sharing a step with a 200-token prompt chunk: the step already does
    # ~200 tokens of work, and a token accepted 70% of the time no longer adds to that rate.
    with_prompt = choose_lengths({"r": 4}, {"r": 0.7}, cost, base_tokens=204, num_seqs=4, prompt_tokens=200)
    assert with_prompt["r"] < alone["r"]
    # Proposals only fill the room the prompt chunks leave.
    capped = choose_lengths({"a": 4, "b": 4, "c": 4}, {"a": 1.0, "b": 1.0, "c": 1.0}, cost, base_tokens=3,
                            num_seqs=3, max_total=5)
    assert sum(capped.values()) == 5
    assert sum(choose_lengths({"a": 4}, {"a": 1.0}, cost, base_tokens=3, num_seqs=3, max_total=0).values()) == 0


def test_adaptive_speculation_leaves_the_budget_to_waiting_prompts():
    from punctual.config import SchedulerConfig, SpeculativeConfig
    from punctual.kv.manager import KVCacheManager
    from punctual.sched.scheduler import Scheduler
    from punctual.spec_decode.speculator import Speculator

    from punctual.plan import ModelRunnerOutput

    budget = 64
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), KVCacheManager(200, 16))
    speculator = Speculator(SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=4,
                                              speculative_length="adaptive"), scheduler.cost_model, budget)
    scheduler.spec_lengths = speculator.choose_lengths  # the lengths are chosen inside schedule()

    def add(rid: str, prompt: list[int]) -> None:
        core = EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        scheduler.add_request(Request(core, max_model_len=10_000), now=0.0)

    def step() -> list:
        plan = scheduler.schedule(0.0, speculator.available(scheduler.running))
        speculator.fill(plan, scheduler.requests)
        # Pretend the model repeats token 7 and accepts every proposal (all proposals here are 7s).
        output = ModelRunnerOutput({s.request_id: [7] * (1 + len(s.spec_token_ids))
                                    for s in plan.scheduled if s.samples})
        scheduler.update_from_output(plan, output, 0.0)
        speculator.record(plan, output)
        return plan.scheduled

    for i in range(4):
        add(f"d{i}", [3, 1, 4, 1, 5])
    for _ in range(3):
        step()
    scheduled = step()
    assert sum(len(s.spec_token_ids) for s in scheduled) > 0, "an idle engine speculates on repeating text"

    add("long", list(range(100, 300)))  # fills the whole budget for several steps
    scheduled = step()
    chunk = next(s for s in scheduled if s.request_id == "long")
    assert sum(len(s.spec_token_ids) for s in scheduled) == 0
    assert chunk.num_new_tokens == budget - 4, "the prompt gets every token the decodes leave"

    long = scheduler.requests["long"]
    while long.is_prefilling:
        remaining = long.num_tokens - long.num_computed_tokens
        scheduled = step()
        chunk = next(s for s in scheduled if s.request_id == "long")
        assert chunk.num_new_tokens == min(remaining, budget - 4)
    # Prompt done: the decodes speculate again (the last chunk's leftover room was theirs too).
    assert sum(len(s.spec_token_ids) for s in step()) > 0
    scheduler.check_integrity()


def test_bad_speculative_arguments_are_named():
    with pytest.raises(ValueError, match="speculative_method"):
        LLM("builtin-tiny", speculative_method="medusa")
    with pytest.raises(ValueError, match="speculative_length"):
        LLM("builtin-tiny", speculative_method="ngram", speculative_length="sometimes")
