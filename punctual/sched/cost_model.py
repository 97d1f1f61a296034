"""How long a step takes, learned online from the engine's own measurements (pure Python).

step_time ~= fixed + per_token * batched_tokens + per_seq * num_seqs

The engine reports each step's wall time; the model keeps exponentially decayed sums for a
least-squares fit, so it follows the machine as load and context lengths drift. Until it has
seen enough steps it answers with a prior (a CPU-sized guess), never with nonsense.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepCostModel:
    fixed_s: float = 0.02  # prior: per-step overhead
    per_token_s: float = 0.0005  # prior: per batched token
    per_seq_s: float = 0.0002  # prior: per running sequence
    decay: float = 0.98  # weight of the past per observation (~50-step memory)
    min_observations: int = 8
    _sums: list[float] = field(default_factory=lambda: [0.0] * 10, repr=False)
    num_observations: int = 0

    def predict(self, batched_tokens: int, num_seqs: int) -> float:
        return max(0.0, self.fixed_s + self.per_token_s * batched_tokens + self.per_seq_s * num_seqs)

    def tokens_within(self, seconds: float, num_seqs: int) -> int:
        """The most batched tokens a step can take and still finish within `seconds`."""
        room = seconds - self.fixed_s - self.per_seq_s * num_seqs
        return max(0, int(room / self.per_token_s)) if self.per_token_s > 0 else 1 << 30

    def observe(self, batched_tokens: int, num_seqs: int, seconds: float) -> None:
        x = (1.0, float(batched_tokens), float(num_seqs))
        s = self._sums
        d = self.decay
        # Decayed sums for the normal equations X^T X (6 unique entries) and X^T y (3) and count.
        products = (x[0] * x[0], x[0] * x[1], x[0] * x[2], x[1] * x[1], x[1] * x[2], x[2] * x[2],
                    x[0] * seconds, x[1] * seconds, x[2] * seconds, 1.0)
        for i, value in enumerate(products):
            s[i] = s[i] * d + value
        self.num_observations += 1
        if self.num_observations >= self.min_observations:
            self._refit()

    def _refit(self) -> None:
        s = self._sums
        # Small ridge toward the current estimate keeps the fit stable when a feature barely varies.
        ridge = 1e-6 * s[0]
        a = [[s[0] + ridge, s[1], s[2]], [s[1], s[3] + ridge, s[4]], [s[2], s[4], s[5] + ridge]]
        b = [s[6], s[7], s[8]]
        solution = _solve3(a, b)
        if solution is None:
            return
        fixed, per_token, per_seq = solution
        if per_token <= 0:  # degenerate fit (e.g. constant batch size): keep the per-token prior
            return
        self.fixed_s, self.per_token_s, self.per_seq_s = max(fixed, 0.0), per_token, max(per_seq, 0.0)


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float] | None:
    """Gaussian elimination with partial pivoting for a 3x3 system."""
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                factor = m[r][col] / m[col][col]
                for c in range(col, 4):
                    m[r][c] -= factor * m[col][c]
    return tuple(m[i][3] / m[i][i] for i in range(3))  # type: ignore[return-value]
