"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the last n-gram.

No extra model: outputs that copy from the prompt (code edits, summaries, RAG answers) are
proposed from the prompt itself. Pure Python, over the request's token list.

When the match lies fewer than `max_tokens` tokens back, the text is repeating with that
period (a table rule, a list of zeros, a loop), so the proposal continues the period instead
of stopping at the end of what was written: after `a b a b a`, lookup proposes `b a b a`.
"""
from __future__ import annotations

from punctual.request import Request
from punctual.spec_decode.proposer import Proposal


class NgramIndex:
    """The latest start of every n-gram (n in min_n..max_n) of an append-only token list, among
    the n-grams that begin before the list's own last n tokens; updated with what was appended,
    so a lookup costs O(max_n) and not a scan of the whole context on every step."""

    def __init__(self, min_n: int, max_n: int):
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = {n: 0 for n in self.latest}  # starts below this are in latest[n]

    def find(self, token_ids: list[int], n: int) -> int | None:
        """Start of the latest earlier occurrence of the last n tokens, or None."""
        length = len(token_ids)
        table = self.latest[n]
        if self.indexed[n] > length - n:  # the list shrank: not append-only after all, start over
            table.clear()
            self.indexed[n] = 0
        for start in range(self.indexed[n], length - n):
            table[tuple(token_ids[start:start + n])] = start
        self.indexed[n] = max(self.indexed[n], length - n)
        return table.get(tuple(token_ids[length - n:]))


class NgramProposer:
    name = "ngram"
    depth_cost_s = 0.0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.indexes: dict[str, NgramIndex] = {}
        self._found: dict[str, list[int]] = {}  # this step's lookups, from `available`

    def available(self, request: Request, max_tokens: int) -> int:
        found = self.lookup(request.token_ids, max_tokens, request.request_id)
        if found:
            self._found[request.request_id] = found
        return len(found)

    def propose(self, wanted: list[tuple[Request, int]]) -> dict[str, Proposal]:
        """The tokens `available` found this step, cut to the chosen lengths."""
        found, self._found = self._found, {}
        return {r.request_id: Proposal(found[r.request_id][:k]) for r, k in wanted if r.request_id in found}

    def lookup(self, token_ids: list[int], max_tokens: int, request_id: str | None = None) -> list[int]:
        """Up to `max_tokens` tokens that followed the most recent earlier match of the longest suffix,
        continued periodically when the match is closer than `max_tokens` to the end.

        With a request_id, the request's n-gram index is kept between calls (its tokens must only
        grow; `forget` it when the request ends)."""
        if max_tokens <= 0:
            return []
        index = self.indexes.get(request_id) if request_id is not None else None
        if index is None:
            index = NgramIndex(self.min_ngram, self.max_ngram)
            if request_id is not None:
                self.indexes[request_id] = index
        length = len(token_ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            start = index.find(token_ids, n)
            if start is None:
                continue
            follow = token_ids[start + n:start + n + max_tokens]
            period = len(follow)  # < max_tokens only when the match runs into the suffix
            while len(follow) < max_tokens:
                follow.append(follow[len(follow) - period])
            return follow
        return []

    def forget(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)
        self._found.pop(request_id, None)
