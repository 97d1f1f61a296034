"""A step-cost profile: how many seconds one step plan takes, from the plan's shape alone.

Pure Python (no torch): the simulator charges each replica's step `predict(features(plan))`
virtual seconds. Two kinds, one interface:

- linear (fitted by `punctual sim calibrate` on the machine at hand):
  fixed + prefill_tokens + decode_rows + context_tokens + attention_pairs + sampled_rows, each
  with a least-squares coefficient in seconds per unit.
- roofline (derived by `--hardware` for a machine not at hand; an estimate):
  overhead + max(FLOPs / (peak FLOP/s x efficiency), bytes / (bandwidth x efficiency)), plus,
  for one rank of a tensor-parallel group, its all-reduces and logit gather on the link.

Features of a plan, summed over its scheduled requests:
  prefill_tokens   prompt work (prompt chunks, recomputation after a preemption)
  decode_rows      requests decoding one token
  context_tokens   KV positions read: start_position + new tokens (a decode's whole context)
  attention_pairs  query-key pairs of attention: new * (start + (new + 1) / 2)
  sampled_rows     positions whose logits are computed and sampled

A linear profile from `calibrate --server` may carry one more coefficient, "prefill_steps":
seconds added to a step with any prompt tokens (in a server, such a step runs while the front
end sets up the new request's stream on the same cores). Absent: 0.

It may also carry `row_factors`, [[low, high, factor], ...] by the streams sampled in a step: the
linear price (all but "prefill_steps") times the factor of the step's bucket. A line in the
features cannot follow the engine's kernels, whose cost jumps where a dispatch table sends a
batch of another size to another kernel (on an AMX Xeon: the fused kernel up to 4 rows, oneDNN
above); the served steps of each bucket set its factor. Absent: 1 everywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from punctual.plan import FEATURES, StepPlan, plan_features  # noqa: F401 (the profile's features, re-exported)

PREFILL_STEPS = "prefill_steps"  # optional linear coefficient: seconds per step with prompt tokens
PROFILE_VERSION = 1


@dataclass
class Roofline:
    """A machine's peaks applied to a model's FLOPs and bytes per feature (an estimate)."""

    peak_flops: float  # FLOP/s, dense, in the model's dtype
    memory_bandwidth: float  # bytes/s
    flops_efficiency: float = 0.6  # fraction of peak a well-tuned engine reaches on large matmuls
    bandwidth_efficiency: float = 0.8
    overhead_s: float = 0.003  # per step: launches, scheduling, sampling on the host
    # The model's work per feature (FEATURES order after "fixed"): FLOPs and bytes.
    flops_per: tuple[float, ...] = (0.0,) * 5
    bytes_fixed: float = 0.0  # bytes read once per step: the weights
    bytes_per: tuple[float, ...] = (0.0,) * 5
    # Tensor parallelism (punctual/sim/tensor_parallel.py; 0 for one rank): the layers' all-reduces
    # per step with any rows, and per row (prefill token or decode row); the logit all-gather per step
    # with sampled rows, and per sampled row. Collectives sit between matmuls: added, not overlapped.
    allreduce_fixed_s: float = 0.0
    allreduce_per_row_s: float = 0.0
    gather_fixed_s: float = 0.0
    gather_per_row_s: float = 0.0

    def predict(self, x: tuple[float, ...]) -> float:
        _, x1, x2, x3, x4, x5 = x
        f1, f2, f3, f4, f5 = self.flops_per
        b1, b2, b3, b4, b5 = self.bytes_per
        flops = f1 * x1 + f2 * x2 + f3 * x3 + f4 * x4 + f5 * x5
        moved = self.bytes_fixed + b1 * x1 + b2 * x2 + b3 * x3 + b4 * x4 + b5 * x5
        return (self.overhead_s + max(flops / (self.peak_flops * self.flops_efficiency),
                                      moved / (self.memory_bandwidth * self.bandwidth_efficiency))
                + self.collective_seconds(x))

    def collective_seconds(self, x: tuple[float, ...]) -> float:
        """The step's time in tensor-parallel collectives (0 on one rank)."""
        rows, sampled = x[1] + x[2], x[5]
        return ((self.allreduce_fixed_s + self.allreduce_per_row_s * rows if rows else 0.0)
                + (self.gather_fixed_s + self.gather_per_row_s * sampled if sampled else 0.0))


@dataclass
class StepProfile:
    kind: str  # "linear" | "roofline"
    coefficients: dict[str, float] = field(default_factory=dict)  # linear: seconds per unit of each feature
    roofline: Roofline | None = None
    model: dict = field(default_factory=dict)  # name, shape, max_model_len, kv_bytes_per_token, weight_bytes
    machine: dict = field(default_factory=dict)  # what it was measured on, or the hardware it estimates
    dtype: str = ""
    num_kv_blocks: int | None = None  # the pool the profiled engine had (its block size in model.block_size)
    kv_memory_bytes: int | None = None  # memory for the KV pool (derived profiles)
    estimate: bool = False  # True for roofline profiles: nobody measured them
    fit: dict = field(default_factory=dict)  # calibration quality: residuals, number of steps
    engine: dict = field(default_factory=dict)  # engine flags of the calibration run
    # The front end's share of what a client sees (`calibrate --server`), in seconds:
    # admit_s   HTTP arrival -> the scheduler has the request (body, tokenizing, the socket)
    # deliver_s a step's outputs sent -> the client has the token (detokenize, SSE, HTTP), plus
    #           deliver_per_stream_s for each stream sampled in that step (absent: 0)
    frontend: dict = field(default_factory=dict)
    # Moving a request's KV between replicas (prefill/decode, migration): seconds = fixed_s +
    # bytes / bytes_per_s per copy (`calibrate` times the real export/import path; `--hardware`
    # derives it from the interconnect). None: not known.
    kv_transfer: dict | None = None
    # The machine's speed at calibration (`punctual.sim.probe`, from `calibrate --server`): a fixed
    # request's seconds per token through the server, for a later probe to compare with. None: not probed.
    speed_probe: dict | None = None
    # How real steps and the front end's admit delay spread around the fit (`punctual.sim.spread`,
    # from `calibrate --server`): {"step_ratio": quantiles of measured / priced, "admit_s": quantiles
    # of the admit delay}, either may be absent. None: the simulator charges the fit exactly.
    spread: dict | None = None
    # The linear price's factor by streams sampled in a step, [[low, high, factor], ...] (see the
    # module's text; `calibrate --server`). None: 1 for every step.
    row_factors: list | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "roofline"):
            raise ValueError(f"profile kind must be linear or roofline, got {self.kind!r}")
        if self.kind == "roofline" and self.roofline is None:
            raise ValueError("a roofline profile needs its roofline")
        self._coef = tuple(float(self.coefficients.get(name, 0.0)) for name in FEATURES)
        self._prefill_step = float(self.coefficients.get(PREFILL_STEPS, 0.0))
        spread = self.spread or {}
        self._step_ratios, self._admit_quantiles = spread.get("step_ratio"), spread.get("admit_s")
        self._row_factor = row_factor_table(self.row_factors) if self.row_factors else None

    def predict(self, x: tuple[float, ...]) -> float:
        if self.roofline is not None:
            return self.roofline.predict(x)
        c = self._coef
        seconds = c[0] + c[1] * x[1] + c[2] * x[2] + c[3] * x[3] + c[4] * x[4] + c[5] * x[5]
        factors = self._row_factor
        if factors is not None:
            rows = int(x[5])
            seconds *= factors[rows] if rows < len(factors) else factors[-1]
        if x[1]:
            seconds += self._prefill_step
        return max(0.0, seconds)

    def step_seconds(self, plan: StepPlan, features: tuple[float, ...] | None = None) -> float:
        """The plan's duration; `features`: its plan_features, when the caller has them already."""
        return self.predict(plan_features(plan) if features is None else features)

    def scaled(self, factor: float) -> "StepProfile":
        """This profile with every step `factor` times as long (the machine that much slower);
        the front end's delays, KV transfers and the spread unchanged."""
        if not factor > 0:
            raise ValueError(f"a profile's speed factor must be positive, got {factor}")
        if self.roofline is not None:
            roof = self.roofline
            roofline = replace(roof, peak_flops=roof.peak_flops / factor, overhead_s=roof.overhead_s * factor,
                               memory_bandwidth=roof.memory_bandwidth / factor,
                               allreduce_fixed_s=roof.allreduce_fixed_s * factor,
                               allreduce_per_row_s=roof.allreduce_per_row_s * factor,
                               gather_fixed_s=roof.gather_fixed_s * factor,
                               gather_per_row_s=roof.gather_per_row_s * factor)
            return replace(self, roofline=roofline)
        return replace(self, coefficients={name: value * factor for name, value in self.coefficients.items()})

    @property
    def admit_s(self) -> float:
        return float(self.frontend.get("admit_s", 0.0))

    @property
    def step_ratios(self) -> list[float] | None:
        """Quantiles of a real step's time over its price, or None (every step at its price)."""
        return self._step_ratios

    @property
    def admit_quantiles(self) -> list[float] | None:
        """Quantiles of the front end's admit delay, or None (every request at admit_s)."""
        return self._admit_quantiles

    @property
    def deliver_s(self) -> float:
        return float(self.frontend.get("deliver_s", 0.0))

    @property
    def deliver_per_stream_s(self) -> float:
        return float(self.frontend.get("deliver_per_stream_s", 0.0))

    def transfer_seconds(self, num_blocks: int, block_size: int) -> float:
        """One copy of `num_blocks` KV blocks between replicas (a copy of none still costs its round trips)."""
        cost = self.kv_transfer
        moved = num_blocks * block_size * self.model.get("kv_bytes_per_token", 0)
        return cost["fixed_s"] + moved / cost["bytes_per_s"]

    @property
    def max_model_len(self) -> int | None:
        return self.model.get("max_model_len")

    def kv_blocks(self, block_size: int, kv_cache_memory: int | None = None) -> int | None:
        """KV blocks of `block_size` tokens in `kv_cache_memory` bytes (else the profile's memory)."""
        per_token = self.model.get("kv_bytes_per_token")
        memory = kv_cache_memory if kv_cache_memory is not None else self.kv_memory_bytes
        if memory is None or not per_token:
            return None
        return max(1, int(memory // (per_token * block_size)))

    def to_json(self) -> dict:
        out = {"version": PROFILE_VERSION, "kind": self.kind, "estimate": self.estimate,
               "coefficients": self.coefficients, "model": self.model, "machine": self.machine,
               "dtype": self.dtype, "num_kv_blocks": self.num_kv_blocks, "kv_memory_bytes": self.kv_memory_bytes,
               "fit": self.fit, "engine": self.engine, "frontend": self.frontend, "kv_transfer": self.kv_transfer}
        if self.speed_probe is not None:
            out["speed_probe"] = self.speed_probe
        if self.spread is not None:
            out["spread"] = self.spread
        if self.row_factors is not None:
            out["row_factors"] = self.row_factors
        if self.roofline is not None:
            out["roofline"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.roofline).items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> "StepProfile":
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile: version {data.get('version')!r} is not {PROFILE_VERSION}")
        roof = data.get("roofline")
        if roof is not None:
            roof = Roofline(**{k: tuple(v) if isinstance(v, list) else v for k, v in roof.items()})
        return cls(kind=data["kind"], coefficients=data.get("coefficients", {}), roofline=roof,
                   model=data.get("model", {}), machine=data.get("machine", {}), dtype=data.get("dtype", ""),
                   num_kv_blocks=data.get("num_kv_blocks"), kv_memory_bytes=data.get("kv_memory_bytes"),
                   estimate=bool(data.get("estimate")), fit=data.get("fit", {}), engine=data.get("engine", {}),
                   frontend=data.get("frontend", {}), kv_transfer=data.get("kv_transfer"),
                   speed_probe=data.get("speed_probe"), spread=data.get("spread"),
                   row_factors=data.get("row_factors"))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def row_factor_table(row_factors: list) -> tuple[float, ...]:
    """The factor for each count of sampled rows 0..the last bucket's low end (a count past the
    table takes its last entry); a count no bucket covers takes 1."""
    try:
        buckets = [(int(low), int(high), float(factor)) for low, high, factor in row_factors]
    except (TypeError, ValueError):
        raise ValueError(f"row_factors: expected [[low, high, factor], ...], got {row_factors!r}") from None
    if any(factor <= 0 or low > high or low < 0 for low, high, factor in buckets):
        raise ValueError(f"row_factors: each bucket needs 0 <= low <= high and a positive factor: {row_factors!r}")
    last = max(low for low, _, _ in buckets)
    table = [1.0] * (last + 1)
    for low, high, factor in buckets:
        for rows in range(low, min(high, last) + 1):
            table[rows] = factor
    return tuple(table)


def load_profile(path: str | Path) -> StepProfile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--profile: no file {path} (make one with `punctual sim calibrate`)")
    try:
        return StepProfile.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--profile {path}: not a step-cost profile ({exc})") from None


def fit_linear(rows: list[tuple[float, ...]], seconds: list[float], relative: bool = True) -> dict[str, float]:
    """Least-squares coefficients of FEATURES for step times, none negative (a feature whose free
    fit comes out negative is dropped and the rest refitted: a cost cannot be a saving).

    `relative`: minimise relative rather than absolute errors, so short decode steps weigh as
    much as long prefills."""
    import numpy as np

    if len(rows) < len(FEATURES):
        raise ValueError(f"calibration: {len(rows)} steps cannot fit {len(FEATURES)} coefficients")
    x = np.asarray(rows, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if relative:
        weight = 1.0 / np.maximum(y, 1e-9)
        x, y = x * weight[:, None], y * weight
    active = [i for i in range(len(FEATURES)) if x[:, i].any()]
    while True:
        # Scale columns so features of very different sizes (pairs vs rows) condition alike.
        cols = x[:, active]
        scale = np.abs(cols).max(axis=0)
        scale[scale == 0] = 1.0
        solution, *_ = np.linalg.lstsq(cols / scale, y, rcond=None)
        solution = solution / scale
        negative = [a for a, c in zip(active, solution) if c < 0]
        if not negative:
            break
        worst = min(negative, key=lambda a: solution[active.index(a)])
        active.remove(worst)
    coefficients = {name: 0.0 for name in FEATURES}
    for a, c in zip(active, solution):
        coefficients[FEATURES[a]] = float(c)
    return coefficients


def fit_robust(rows: list[tuple[float, ...]], seconds: list[float], rounds: int = 3,
               slack: float = 0.5) -> tuple[dict[str, float], list[int]]:
    """fit_linear, then again without the steps that took more than (1 + slack) x the fit: on a
    shared machine interference only ever slows a step, so those are noise, not cost. Returns
    the coefficients and the indices of the steps kept."""
    kept = list(range(len(rows)))
    coefficients = fit_linear(rows, seconds)
    for _ in range(rounds):
        profile = StepProfile("linear", coefficients)
        keep = [i for i in range(len(rows)) if seconds[i] <= (1 + slack) * profile.predict(rows[i])]
        if keep == kept or len(keep) < 2 * len(FEATURES):
            break
        kept = keep
        coefficients = fit_linear([rows[i] for i in kept], [seconds[i] for i in kept])
    return coefficients, kept
