"""How long a step takes, learned online from the engine's own measurements (pure Python).

step_time ~= fixed + per_token * batched_tokens + per_seq * num_seqs + per_row * sampled_rows

sampled_rows are the positions whose logits are computed and sampled: one per sequence that
reaches the end of its tokens, plus one per speculated token under verification. A speculated
token costs a batched token *and* a row of the vocabulary projection and of sampling, which a
prompt token does not pay; without this feature the speculation length was chosen against a
cost model that saw verification as cheap as prefill. Rows default to one per sequence.

The engine reports each step's wall time; the model keeps exponentially decayed sums for a
least-squares fit, so it follows the machine as load and context lengths drift. Until it has
seen enough steps it answers with a prior (a CPU-sized guess), never with nonsense. The fit is
solved when a prediction is asked for, not per observation: under a policy that never asks
(fcfs), a step costs one update of the sums.
"""
from __future__ import annotations


class StepCostModel:
    """The fit's coefficients read as attributes (`fixed_s`, `per_token_s`, `per_seq_s`,
    `per_row_s`: the prior until `min_observations` steps were seen); setting one replaces it
    until the next observation."""

    def __init__(self, fixed_s: float = 0.02, per_token_s: float = 0.0005, per_seq_s: float = 0.0002,
                 per_row_s: float = 0.0, decay: float = 0.98, min_observations: int = 8):
        # Priors: per-step overhead, per batched token, per running sequence, per sampled row
        # beyond the cost of its token (learned).
        self._coefficients = [fixed_s, per_token_s, per_seq_s, per_row_s]
        self.decay = decay  # weight of the past per observation (~50-step memory)
        self.min_observations = min_observations
        self._sums = [0.0] * 15
        self.num_observations = 0
        self._stale = False  # observations since the last fit

    def coefficients(self) -> tuple[float, float, float, float]:
        """(fixed_s, per_token_s, per_seq_s, per_row_s) as fitted to every observation so far."""
        if self._stale:
            self._refit()
        return tuple(self._coefficients)

    def _coefficient(index: int):  # noqa: N805 (a property factory, used in the class body)
        def get(self) -> float:
            return self.coefficients()[index]

        def set_(self, value: float) -> None:
            if self._stale:
                self._refit()
            self._coefficients[index] = value
        return property(get, set_)

    fixed_s, per_token_s, per_seq_s, per_row_s = _coefficient(0), _coefficient(1), _coefficient(2), _coefficient(3)
    del _coefficient

    def __repr__(self) -> str:
        fixed, per_token, per_seq, per_row = self.coefficients()
        return (f"StepCostModel(fixed_s={fixed:.6g}, per_token_s={per_token:.6g}, per_seq_s={per_seq:.6g}, "
                f"per_row_s={per_row:.6g}, observations={self.num_observations})")

    def predict(self, batched_tokens: int, num_seqs: int, sampled_rows: int | None = None) -> float:
        rows = num_seqs if sampled_rows is None else sampled_rows
        fixed, per_token, per_seq, per_row = self.coefficients()
        return max(0.0, fixed + per_token * batched_tokens + per_seq * num_seqs + per_row * rows)

    def tokens_within(self, seconds: float, num_seqs: int) -> int:
        """The most batched tokens a step can take and still finish within `seconds`."""
        fixed, per_token, per_seq, per_row = self.coefficients()
        room = seconds - fixed - (per_seq + per_row) * num_seqs
        return max(0, int(room / per_token)) if per_token > 0 else 1 << 30

    def observe(self, batched_tokens: int, num_seqs: int, seconds: float, sampled_rows: int | None = None) -> None:
        rows = num_seqs if sampled_rows is None else sampled_rows
        t, q, r, y = float(batched_tokens), float(num_seqs), float(rows), seconds
        d = self.decay
        # Decayed sums for the normal equations: X^T X (10 unique entries, x = 1, t, q, r),
        # X^T y (4), and the count; written out, as this runs once per step of every replica.
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14 = self._sums
        self._sums = [s0 * d + 1.0, s1 * d + t, s2 * d + q, s3 * d + r, s4 * d + t * t, s5 * d + t * q,
                      s6 * d + t * r, s7 * d + q * q, s8 * d + q * r, s9 * d + r * r, s10 * d + y,
                      s11 * d + t * y, s12 * d + q * y, s13 * d + r * y, s14 * d + 1.0]
        self.num_observations += 1
        self._stale = self.num_observations >= self.min_observations

    def observe_steps(self, batched_tokens: int, num_seqs: int, durations, sampled_rows: int | None = None) -> None:
        """`observe` once per duration, in order, for steps of one shape (the simulator's runs of
        repeated decode steps): the same sums, bit for bit, without a call per step."""
        rows = num_seqs if sampled_rows is None else sampled_rows
        t, q, r = float(batched_tokens), float(num_seqs), float(rows)
        d = self.decay
        tt, tq, tr, qq, qr, rr = t * t, t * q, t * r, q * q, q * r, r * r
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14 = self._sums
        count = 0
        for y in durations:
            s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = (s0 * d + 1.0, s1 * d + t, s2 * d + q, s3 * d + r, s4 * d + tt,
                                                      s5 * d + tq, s6 * d + tr, s7 * d + qq, s8 * d + qr, s9 * d + rr)
            s10, s11, s12, s13, s14 = s10 * d + y, s11 * d + t * y, s12 * d + q * y, s13 * d + r * y, s14 * d + 1.0
            count += 1
        if count:
            self._sums = [s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14]
            self.num_observations += count
            self._stale = self.num_observations >= self.min_observations

    def _refit(self) -> None:
        self._stale = False
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
        self._coefficients = [max(fixed, 0.0), per_token, max(per_seq, 0.0), max(per_row, 0.0)]


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
