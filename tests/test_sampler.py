"""The sampler's building blocks: drawing from a distribution, and top-k without a full sort."""
from __future__ import annotations

import torch

from punctual.runner.sampler import Sampler, draw
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
