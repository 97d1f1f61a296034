"""The simulator as the bench's load generator: `punctual.bench.sweep.bench_endpoint` runs its
warm-ups, salts, rate sweeps and bisections unchanged, with `send` answering in virtual time,
so a simulated report has the same requests and the same JSON as a measured one.

Prompts become token ids word by word: every workload word is one token in the built-in
tokenizer (and the GPT-2, Llama and SmolLM ones), so lengths and shared prefixes match what a
server would see; the id is the word's place in the workload's word list.

With per-request records left out (`--no-records`, for huge runs), a record keeps only its
first and last token time and the simulator folds the rest into streamed statistics (pooled
inter-token gaps counted by the microsecond, token deadlines met), which replace the ITL and
fluidity figures that `summarize` would compute from full records: the same values to the
microsecond, without a float per token held (a million requests' gaps are a few thousand
distinct microsecond counts, where distinct floats were one per simulated step).
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from punctual.bench.loadgen import LoadResult, RequestRecord
from punctual.bench.metrics import SLO, token_deadlines_met
from punctual.bench.workloads import WORDS, BenchRequest
from punctual.sim.engine import Outcome, Simulator, SimRequest
from punctual.sim.lora import zipf_adapters

WORD_IDS = {word: i + 1 for i, word in enumerate(WORDS)}
UNKNOWN_BASE = len(WORDS) + 1  # words of a trace's own text: a stable id above the list's
UNKNOWN_SPAN = 30000


CHARS_PER_TOKEN = 4  # real text: a word of n characters is about n / 4 tokens (at least one)


def _word_ids(word: str) -> tuple[int, ...]:
    known = WORD_IDS.get(word)
    if known is not None:
        return (known,)
    return tuple(UNKNOWN_BASE + zlib.crc32(f"{word}#{piece}".encode()) % UNKNOWN_SPAN
                 for piece in range(max(1, round(len(word) / CHARS_PER_TOKEN))))


_WORD_CACHE: dict[str, tuple[int, ...]] = {}  # workloads reuse a corpus's words: each is split once
_WORD_CACHE_MAX = 1 << 20


def token_ids(prompt: str) -> tuple[int, ...]:
    """Stand-in token ids for a prompt, without a tokenizer: one per word of the synthetic word list,
    and for real text about one per four characters of each word, so lengths come out close to a
    BPE tokenizer's and equal texts (shared prefixes) get equal ids."""
    ids: list[int] = []
    cache = _WORD_CACHE
    for word in prompt.split():
        pieces = cache.get(word)
        if pieces is None:
            pieces = _word_ids(word)
            if len(cache) < _WORD_CACHE_MAX:
                cache[word] = pieces
        ids.extend(pieces)
    return tuple(ids)


def to_sim_requests(requests: list[BenchRequest]) -> list[SimRequest]:
    return [SimRequest(i, token_ids(r.prompt), r.output_len, r.user, r.prompt_len) for i, r in enumerate(requests)]


PENDING_GAPS = 1 << 20  # gaps held before they are counted (8 MB of int64)


@dataclass
class StreamedStats:
    """ITL and token deadlines of one run, gathered as requests finish (records left out)."""

    itl: Counter = field(default_factory=Counter)  # gap (whole microseconds) -> count, once flushed
    deadlines_met: int = 0
    deadline_tokens: int = 0
    # Finished requests' gaps not counted yet: one sort over many requests' gaps costs a fraction
    # of a dict update per gap.
    pending: list = field(default_factory=list, repr=False)
    num_pending: int = 0

    def add_gaps(self, gaps: np.ndarray) -> None:
        self.pending.append(gaps)
        self.num_pending += len(gaps)
        if self.num_pending >= PENDING_GAPS:
            self.flush()

    def flush(self) -> None:
        """Count the pending gaps into `itl`."""
        if self.pending:
            values, counts = np.unique(np.concatenate(self.pending), return_counts=True)
            self.itl.update(dict(zip(values.tolist(), counts.tolist())))
            self.pending, self.num_pending = [], 0

    def merge(self, other: "StreamedStats") -> None:
        self.flush()
        other.flush()
        self.itl.update(other.itl)
        self.deadlines_met += other.deadlines_met
        self.deadline_tokens += other.deadline_tokens

    def itl_ms(self) -> dict | None:
        """distribution_ms of the pooled gaps, from counts (the same order statistics)."""
        self.flush()
        n = sum(self.itl.values())
        if n == 0:
            return None
        values = sorted(self.itl.items())
        total = sum(gap * count for gap, count in values) / 1000

        def at(q: float) -> float:
            position = (n - 1) * q / 100
            low, high = int(position), -int(-position // 1)
            return _order_stat(values, low) + (_order_stat(values, high) - _order_stat(values, low)) * (position - low)
        return {"mean": total / n, "median": at(50), "p90": at(90), "p99": at(99), "count": n}


def _order_stat(values: list[tuple[float, int]], k: int) -> float:
    seen = 0
    for gap, count in values:
        seen += count
        if k < seen:
            return gap / 1000
    return values[-1][0] / 1000


class SimSender:
    """`send` for bench_endpoint: runs the requests on the simulator and returns a LoadResult."""

    def __init__(self, simulator: Simulator, keep_token_times: bool = True, slo: SLO | None = None,
                 num_adapters: int = 0, adapter_zipf: float = 1.0):
        """`num_adapters`: each request runs under one of this many LoRA adapters (Zipf popularity
        with `adapter_zipf`, the same draw for every run); 0: the base model."""
        self.simulator = simulator
        self.num_adapters, self.adapter_zipf = num_adapters, adapter_zipf
        self.keep_token_times = keep_token_times
        self.slo = slo
        self.streamed: list[StreamedStats] = []  # one per measured run (not warm-ups), in order

    def __call__(self, endpoint, requests: list[BenchRequest], *, offsets=None, concurrency=None,
                 progress: bool = False, desc: str | None = None, **_) -> LoadResult:
        if offsets is None and concurrency is None:
            offsets = [r.arrival_s for r in requests]
            if any(o is None for o in offsets):
                raise ValueError("give offsets, concurrency, or requests with arrival times (a trace)")
        run_shards = getattr(self.simulator, "run_shards", None)
        if run_shards is not None:
            records, stats, duration = run_shards(requests, offsets, concurrency, self.keep_token_times, self.slo)
        else:
            sim_requests = to_sim_requests(requests)
            if self.num_adapters:
                for request, adapter in zip(sim_requests, zipf_adapters(len(sim_requests), self.num_adapters,
                                                                        self.adapter_zipf)):
                    request.adapter = adapter
            records, stats, duration = self.run_local(sim_requests, offsets, concurrency)
        if desc != "warm-up":
            self.streamed.append(stats)
        return LoadResult(records, duration)

    def run_local(self, sim_requests: list[SimRequest], offsets=None, concurrency=None,
                  routes: list[int] | None = None) -> tuple[list[RequestRecord], StreamedStats, float]:
        """Run on this process's simulator: (records by index, streamed statistics, duration)."""
        stats = StreamedStats()
        records: list[RequestRecord] = []
        start = self.simulator.now

        def on_finish(outcome: Outcome) -> None:
            records.append(self._record(outcome, start, stats))

        _, duration = self.simulator.run(sim_requests, offsets=offsets, concurrency=concurrency, on_finish=on_finish,
                                         routes=routes)
        records.sort(key=lambda r: r.index)
        return records, stats, duration

    def _record(self, outcome: Outcome, start: float, stats: StreamedStats) -> RequestRecord:
        request, sent = outcome.request, outcome.sent
        folded = not self.keep_token_times and outcome.error is None and bool(outcome.token_times)
        if folded:  # the same float64 subtractions, in numpy: only their statistics are kept
            offsets = np.asarray(outcome.token_times) - sent
            times = offsets.tolist() if self.slo is not None else offsets[[0, -1]].tolist()
        elif len(outcome.token_times) > 64:  # the same float64 subtractions; numpy's loop wins past a few dozen
            times = (np.asarray(outcome.token_times) - sent).tolist()
        else:
            times = [t - sent for t in outcome.token_times]
        record = RequestRecord(request.index, request.prompt_len or len(request.prompt_token_ids), request.output_len,
                               request.user, scheduled_s=sent - start, sent_s=sent - start,
                               prompt_tokens=outcome.prompt_tokens, error=outcome.error)
        if outcome.error is None:
            record.e2e_s = outcome.finished - sent
            record.usage_output_tokens = len(outcome.token_times)
            record.finish_reason = "length"
            record.ttft_s = times[0] if times else None
        if self.keep_token_times:
            record.token_times_s = times
            return record
        if folded:
            # Gaps to the microsecond, rounded half to even as round() does, from the same doubles.
            stats.add_gaps(np.rint(np.diff(offsets) * 1e6).astype(np.int64))
            if self.slo is not None:
                stats.deadlines_met += token_deadlines_met(times, self.slo)
                stats.deadline_tokens += len(times)
            record.token_times_s = [times[0], times[-1]] if len(outcome.token_times) > 1 else times[:1]
        else:
            stats.deadline_tokens += request.output_len
        return record

    def patch(self, runs: list[dict]) -> None:
        """Put the streamed ITL and fluidity into the summaries (records were left out)."""
        if self.keep_token_times:
            return
        for run, stats in zip(runs, self.streamed):
            summary = run["summary"]
            summary["itl_ms"] = stats.itl_ms()
            if "slo" in summary and stats.deadline_tokens:
                summary["slo"]["fluidity_index"] = stats.deadlines_met / stats.deadline_tokens


__all__ = ["SimSender", "StreamedStats", "to_sim_requests", "token_ids"]
