"""How long a step takes, learned online from the engine's own measurements (pure Python).

step_time ~= fixed + per_token * batched_tokens + per_seq * num_seqs + per_row * sampled_rows

sampled_rows are the positions whose logits are computed and sampled: one per sequence that
reaches the end of its tokens, plus one per speculated token under verification. A speculated
token costs a batched token *and* a row of the vocabulary projection and of sampling, which a
prompt token does not pay; without this feature the speculation length was chosen against a
cost model that saw verification as cheap as prefill. Rows default to one per sequence.

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
    per_row_s: float = 0.0  # prior: per sampled row beyond the cost of its token (learned)
    decay: float = 0.98  # weight of the past per observation (~50-step memory)
    min_observations: int = 8
    _sums: list[float] = field(default_factory=lambda: [0.0] * 15, repr=False)
    num_observations: int = 0

    def predict(self, batched_tokens: int, num_seqs: int, sampled_rows: int | None = None) -> float:
        rows = num_seqs if sampled_rows is None else sampled_rows
        return max(0.0, self.fixed_s + self.per_token_s * batched_tokens + self.per_seq_s * num_seqs
                   + self.per_row_s * rows)

    def tokens_within(self, seconds: float, num_seqs: int) -> int:
        """The most batched tokens a step can take and still finish within `seconds`."""
        room = seconds - self.fixed_s - (self.per_seq_s + self.per_row_s) * num_seqs
        return max(0, int(room / self.per_token_s)) if self.per_token_s > 0 else 1 << 30

    def observe(self, batched_tokens: int, num_seqs: int, seconds: float, sampled_rows: int | None = None) -> None:
        rows = num_seqs if sampled_rows is None else sampled_rows
        x = (1.0, float(batched_tokens), float(num_seqs), float(rows))
        s = self._sums
        d = self.decay
        # Decayed sums for the normal equations: X^T X (10 unique entries), X^T y (4), and the count.
        products = [x[i] * x[j] for i in range(4) for j in range(i, 4)] + [xi * seconds for xi in x] + [1.0]
        for i, value in enumerate(products):
            s[i] = s[i] * d + value
        self.num_observations += 1
        if self.num_observations >= self.min_observations:
            self._refit()

    def _refit(self) -> None:
        s = self._sums
        gram = [[0.0] * 4 for _ in range(4)]
        k = 0
        for i in range(4):
            for j in range(i, 4):
                gram[i][j] = gram[j][i] = s[k]
                k += 1
        # A small ridge keeps the fit stable when a feature barely varies (rows == seqs when
        # nothing is speculated: then the two split their shared cost, and predictions hold).
        ridge = 1e-6 * s[0]
        for i in range(4):
            gram[i][i] += ridge
        solution = _solve(gram, s[10:14])
        if solution is None:
            return
        fixed, per_token, per_seq, per_row = solution
        if per_token <= 0:  # degenerate fit (e.g. constant batch size): keep the per-token prior
            return
        self.fixed_s, self.per_token_s = max(fixed, 0.0), per_token
        self.per_seq_s, self.per_row_s = max(per_seq, 0.0), max(per_row, 0.0)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a small square system."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= factor * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]
