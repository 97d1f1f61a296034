"""Grammar text -> a ready llguidance matcher, compiled off the step loop, cached by spec.

LLMatcher's constructor drops the GIL, so compiling on a worker thread does not stall the
step loop or the event loop. A compiled matcher is kept pristine in the cache (after its first
mask, which builds the lexer lazily: where the slow schemas spend their time) and every
request gets a deep copy (~0.06 ms on a 49k vocabulary).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import OrderedDict
from typing import Callable

import llguidance
import llguidance.hf

from punctual.structured.grammar import to_grammar
from punctual.structured.spec import StructuredOutput

DEFAULT_TIMEOUT_S = 10.0


class GrammarError(ValueError):
    """The spec is invalid or unsupported, or did not compile in time; the message names why."""


class GrammarCompiler:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = 256, max_workers: int = 2):
        """load_tokenizer: returns the checkpoint's (fast) HF tokenizer; called once, on the first
        compile, so a server that never sees a grammar never pays the ~0.4 s to wrap it."""
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutput, concurrent.futures.Future] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self.num_compiled = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._load_tokenizer(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def submit(self, spec: StructuredOutput) -> concurrent.futures.Future:
        """A future of the pristine matcher for `spec` (shared: deep-copy it, see `new_matcher`);
        it raises GrammarError for a spec that is invalid. Failures are cached too (they are
        deterministic); a cancelled or timed-out compile is not, see `drop`."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._cache[spec] = self._pool.submit(self._compile, spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def drop(self, spec: StructuredOutput) -> None:
        with self._lock:
            self._cache.pop(spec, None)

    def compile(self, spec: StructuredOutput, timeout_s: float = DEFAULT_TIMEOUT_S) -> llguidance.LLMatcher:
        """Blocking: a fresh matcher for `spec`; GrammarError when invalid or slower than timeout_s."""
        future = self.submit(spec)
        try:
            return future.result(timeout_s).deep_copy()
        except concurrent.futures.TimeoutError:
            self.drop(spec)
            raise GrammarError(f"the {spec.kind} grammar did not compile within {timeout_s:g} s") from None

    @staticmethod
    def new_matcher(future: concurrent.futures.Future) -> llguidance.LLMatcher:
        """A request's own matcher from a finished `submit` future (raises its GrammarError)."""
        return future.result(0).deep_copy()

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        try:
            grammar = to_grammar(spec)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"invalid {spec.kind}: {exc}") from None
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the lexer now, not in the first step that needs it
        if matcher.is_error():
            raise GrammarError(f"invalid or unsupported {spec.kind}: {matcher.get_error().strip()}")
        self.num_compiled += 1
        self.last_compile_s = time.perf_counter() - started
        return matcher


class GrammarWaitlist:
    """Requests held back (before the scheduler sees them) until their grammar is compiled.

    The core adds a request here instead of to the scheduler; each step it takes the ready ones
    (and the failed ones, to reject). A compile slower than timeout_s fails its request."""

    def __init__(self, compiler: GrammarCompiler, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.compiler = compiler
        self.timeout_s = timeout_s
        # request id -> (item, spec, future, deadline)
        self._waiting: dict[str, tuple[object, StructuredOutput, concurrent.futures.Future, float]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request_id: str, spec: StructuredOutput, item: object) -> None:
        self._waiting[request_id] = (item, spec, self.compiler.submit(spec), time.monotonic() + self.timeout_s)

    def discard(self, request_ids: list[str]) -> list[object]:
        return [entry[0] for rid in request_ids if (entry := self._waiting.pop(rid, None)) is not None]

    def take(self) -> tuple[list[tuple[object, llguidance.LLMatcher]], list[tuple[str, str]]]:
        """(ready items with their own matcher, [(request id, why it failed)])."""
        ready, failed = [], []
        now = time.monotonic()
        for request_id, (item, spec, future, deadline) in list(self._waiting.items()):
            if future.done():
                del self._waiting[request_id]
                try:
                    ready.append((item, self.compiler.new_matcher(future)))
                except GrammarError as exc:
                    failed.append((request_id, str(exc)))
            elif now > deadline:
                del self._waiting[request_id]
                self.compiler.drop(spec)
                failed.append((request_id, f"the {spec.kind} grammar did not compile within {self.timeout_s:g} s"))
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Block until a compile finishes or timeout_s passes: the core has nothing else to do."""
        futures = [entry[2] for entry in self._waiting.values()]
        if futures:
            concurrent.futures.wait(futures, timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)
