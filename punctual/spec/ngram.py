"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the last n-gram.

No extra model: outputs that copy from the prompt (code edits, summaries, RAG answers) are
proposed from the prompt itself. Pure Python, over the request's token list.

When the match lies fewer than `max_tokens` tokens back, the text is repeating with that
period (a table rule, a list of zeros, a loop), so the proposal continues the period instead
of stopping at the end of what was written: after `a b a b a`, lookup proposes `b a b a`.
"""
from __future__ import annotations


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the most recent earlier match of the longest suffix,
        continued periodically when the match is closer than `max_tokens` to the end."""
        if max_tokens <= 0:
            return []
        length = len(token_ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = token_ids[length - n:]
            first = suffix[0]
            # Scan right to left for the latest earlier occurrence of the suffix.
            for start in range(length - n - 1, -1, -1):
                if token_ids[start] == first and token_ids[start:start + n] == suffix:
                    follow = token_ids[start + n:start + n + max_tokens]
                    period = len(follow)  # < max_tokens only when the match runs into the suffix
                    while len(follow) < max_tokens:
                        follow.append(follow[len(follow) - period])
                    return follow
        return []
