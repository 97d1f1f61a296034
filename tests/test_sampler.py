"""The sampler's building blocks: drawing from a distribution, top-k without a full sort, logit_bias."""
from __future__ import annotations

import pytest
import torch

from punctual.runner.sampler import RequestState, Sampler, draw
from punctual.sampling_params import SamplingParams


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    gen = torch.Generator().manual_seed(0)
    # Unnormalised rows, zeros at both ends and in the middle.
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    draws = 20000
    counts = torch.zeros_like(probs)
    for _ in range(draws // 100):
        picks = draw(probs.repeat_interleave(100, dim=0), gen).view(2, 100)
        for row in range(2):
            counts[row] += torch.bincount(picks[row], minlength=probs.shape[1])
    assert (counts[probs == 0] == 0).all()
    assert counts[1, 5] == draws
    expected = probs[0, [1, 3, 4]] / probs[0].sum() * draws
    chi2 = float(((counts[0, [1, 3, 4]] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, counts[0]  # df=2, p=0.001


def test_draw_is_reproducible_with_a_seeded_generator():
    probs = torch.rand(4, 1000)
    a = draw(probs, torch.Generator().manual_seed(7))
    b = draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_top_k_without_a_sort_is_the_same_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 2000) * 3
    rows = [SamplingParams(temperature=0.7, top_k=40), SamplingParams(temperature=1.0, top_k=5, top_p=0.8),
            SamplingParams(temperature=1.3, top_k=100, min_p=0.05)]
    fast = Sampler._probs(rows, logits)
    # A row without top-k sends the whole batch through the full sort.
    slow = Sampler._probs(rows + [SamplingParams(temperature=1.0, top_p=0.5)], torch.cat([logits, logits[:1]]))[:3]
    torch.testing.assert_close(fast, slow)
    assert ((fast > 0).sum(dim=-1) <= torch.tensor([40, 5, 100])).all()


# ---- logit_bias ------------------------------------------------------------------------------
def _state(request_id: str, params: SamplingParams, vocab: int) -> RequestState:
    return RequestState(request_id, params, [0], (1,), (), vocab)


def _kernels():
    """The fused CPU kernels where they build here (their argmax is the greedy fast path), else None."""
    from punctual.kernels import cpu_kernels

    return cpu_kernels.load()


def test_logit_bias_moves_only_the_biased_rows_greedy_and_sampled():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab)
    best = logits.argmax(dim=-1).tolist()
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    forced = (best[0] + 1) % vocab
    rows = [SamplingParams(temperature=0, logit_bias={forced: 100}),   # +100: the token is chosen
            SamplingParams(temperature=0),                           # no bias: its argmax, untouched
            SamplingParams(temperature=0, logit_bias={best[2]: -100}),  # -100: greedy's pick is banned
            SamplingParams(temperature=0.7, logit_bias={forced: 100}, seed=1)]  # sampled rows too
    states = [_state(f"r{i}", p, vocab) for i, p in enumerate(rows)]
    raw = logits.clone()
    for kernels in {None, _kernels()}:
        sampler = Sampler(torch.device("cpu"), kernels=kernels)
        for batch in (states[:3], states):  # all greedy (the fast argmax path), and mixed
            tokens, _ = sampler.sample(logits[:len(batch)], batch)
            assert tokens[:3] == [forced, best[1], second[2]]
            if len(batch) == 4:
                assert tokens[3] == forced
    assert torch.equal(logits, raw)  # the caller's logits are not modified


def test_logit_bias_leaves_logprobs_unbiased_and_keeps_grammar_masks():
    vocab = 10
    logits = torch.randn(1, vocab)
    logits[0, 3] = float("-inf")  # a token a grammar masked out stays out, whatever its bias
    state = _state("r", SamplingParams(temperature=0, logprobs=0, logit_bias={3: 100, 5: 100}), vocab)
    tokens, logprobs = Sampler(torch.device("cpu")).sample(logits, [state])
    assert tokens == [5]
    assert logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[5]))


def test_logit_bias_applies_to_verification_rows():
    vocab = 8
    logits = torch.zeros(3, vocab)
    logits[:, 2] = 5.0  # every row's argmax is 2: drafts [2, 2] would be accepted without a bias
    sampler = Sampler(torch.device("cpu"), seed=0)
    banned = _state("g", SamplingParams(temperature=0, logit_bias={2: -100}), vocab)
    tokens, _ = sampler.verify(logits, banned, [2, 2])
    assert tokens == [0]  # the first draft is rejected; the corrected token is the biased argmax
    sampled = _state("s", SamplingParams(temperature=1.0, logit_bias={2: -100, 6: 100}), vocab)
    for _ in range(20):
        (tokens, _), = sampler.verify_sampled(logits, [(0, sampled, [2, 2], None)])
        assert tokens == [6]  # p(2) is ~0 after the bias: rejected, and 6 carries the mass


def test_logit_bias_is_validated():
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={5: 101})
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match="at most 300"):
        SamplingParams(logit_bias={i: 1.0 for i in range(301)})
    assert SamplingParams(logit_bias={}).logit_bias is None
