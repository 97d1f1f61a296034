"""Online output-length prediction for shortest-job-first (pure Python).

Features: the tenant's recent output lengths (an exponential average per user), a decayed
least-squares line on prompt length for everyone, and `max_tokens` as a hard cap. Rank
correlation (Spearman) between predictions and outcomes is tracked, since SJF only needs the
order right (the learning-to-rank view), not the lengths.
"""
from __future__ import annotations

from collections import deque


class OutputLengthPredictor:
    def __init__(self, prior: float = 128.0, user_weight: float = 0.3, decay: float = 0.99,
                 history: int = 512):
        self.prior = prior
        self.user_weight = user_weight  # EMA step for each user's mean
        self.decay = decay
        self.user_mean: dict[str, float] = {}
        self._sums = [0.0] * 5  # decayed n, sum x, sum y, sum xx, sum xy for y ~ a + b x
        self._pairs: deque[tuple[float, float]] = deque(maxlen=history)  # (predicted, actual)
        # The engine reports it after every step; it changes only when a request finishes.
        self._rank_correlation: float | None = None

    def _global(self, prompt_len: int) -> float:
        n, sx, sy, sxx, sxy = self._sums
        if n < 4:
            return self.prior
        var = sxx - sx * sx / n
        slope = (sxy - sx * sy / n) / var if var > 1e-9 else 0.0
        return max(1.0, sy / n + slope * (prompt_len - sx / n))

    def predict(self, prompt_len: int, max_tokens: int | None, user: str | None) -> float:
        guess = self.user_mean.get(user or "", self._global(prompt_len))
        return float(min(guess, max_tokens)) if max_tokens else guess

    def observe(self, prompt_len: int, output_len: int, user: str | None, predicted: float | None) -> None:
        key = user or ""
        previous = self.user_mean.get(key)
        self.user_mean[key] = output_len if previous is None else (
            previous + self.user_weight * (output_len - previous))
        s, d, x, y = self._sums, self.decay, float(prompt_len), float(output_len)
        for i, value in enumerate((1.0, x, y, x * x, x * y)):
            s[i] = s[i] * d + value
        if predicted is not None:
            self._pairs.append((predicted, float(output_len)))
            if len(self._pairs) >= 3:
                self._rank_correlation = spearman([p for p, _ in self._pairs], [a for _, a in self._pairs])

    def rank_correlation(self) -> float | None:
        """Spearman's rho between recent predictions and actual output lengths (None below 3 pairs)."""
        return self._rank_correlation


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their mean rank
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    rx, ry = _ranks(xs), _ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / (vx * vy) ** 0.5
