"""Runner-side structured decoding: one llguidance matcher per request, keyed by request id.

The matcher holds the request's kept output tokens. Each step the runner asks for masks on
just the logits rows of guided requests; with speculation, row i of a request is masked for
the state after its first i proposals, so a proposal outside the grammar has probability 0 and
is rejected by greedy and by rejection sampling alike. The proposals consumed to compute those
masks are rolled back, and the tokens actually kept are consumed (`advance`). A preempted
request keeps its matcher: recomputing its KV samples only the next token, so nothing is
consumed twice.
"""
from __future__ import annotations

import logging

import llguidance
import numpy as np
import torch

logger = logging.getLogger(__name__)



class Guide:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.matchers: dict[str, llguidance.LLMatcher] = {}
        self._pending_rollback: dict[str, int] = {}  # request id -> proposals consumed for masking
        self._bitmask = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)

    def start(self, request_id: str, matcher: llguidance.LLMatcher) -> None:
        self.matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self._pending_rollback.pop(request_id, None)

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor, rows: list[tuple[int, str, list[int]]]) -> None:
        """Mask logits [R, V] in place. rows: (first row, request id, proposals) for every request
        sampling this step; row first+i predicts the token after proposals[:i]. Requests
        without a matcher are skipped (cost: a dict lookup)."""
        fills: list[tuple[int, str, list[int]]] = [r for r in rows if r[1] in self.matchers]
        if not fills:
            return
        logit_rows: list[int] = []
        if self._bitmask.shape[0] < sum(1 + len(p) for _, _, p in fills):
            self._bitmask = torch.empty(2 * sum(1 + len(p) for _, _, p in fills), self._bitmask.shape[1],
                                        dtype=torch.int32)
        n = 0
        for first, request_id, proposals in fills:
            matcher = self.matchers[request_id]
            consumed = 0
            for i in range(len(proposals) + 1):
                self._fill(matcher, n)
                logit_rows.append(first + i)
                n += 1
                # Past the first proposal the grammar refuses, later rows are never used.
                if i == len(proposals) or not self._allows(n - 1, proposals[i]):
                    break
                if not matcher.consume_token(proposals[i]):
                    break
                consumed += 1
            if consumed:
                self._pending_rollback[request_id] = consumed
        # numpy, one thread: torch splits a 49k-element op across threads, which costs ~10 ms
        # a call when the cores are shared. Bit j of word w is token 32*w + j (little-endian).
        refused = np.unpackbits(self._bitmask[:n].numpy().view(np.uint8), axis=1, bitorder="little")
        refused = refused[:, :logits.shape[-1]] == 0
        if logits.device.type == "cpu":
            values = logits.numpy()  # shares memory with logits
            for j, row in enumerate(logit_rows):
                np.copyto(values[row], -np.inf, where=refused[j])
        else:
            index = torch.tensor(logit_rows, device=logits.device)
            logits[index] = logits[index].masked_fill(torch.from_numpy(refused).to(logits.device), float("-inf"))

    def advance(self, sampled: dict[str, list[int]]) -> None:
        """Roll back the proposals consumed for masking and consume the tokens kept this step."""
        for request_id, consumed in self._pending_rollback.items():
            self.matchers[request_id].rollback(consumed)
        self._pending_rollback.clear()
        for request_id, tokens in sampled.items():
            matcher = self.matchers.get(request_id)
            if matcher is None:
                continue
            for token in tokens:
                if matcher.is_stopped():  # the grammar is complete: what follows is EOS, and the request ends
                    break
                if not matcher.consume_token(token):
                    # Only if a token skipped the mask (ignore_eos past the end, say): stop guiding.
                    logger.warning("request %s left its grammar: %s", request_id, matcher.get_error())
                    del self.matchers[request_id]
                    break

    def _fill(self, matcher: llguidance.LLMatcher, row: int) -> None:
        view = self._bitmask[row]
        matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def _allows(self, row: int, token: int) -> bool:
        return 0 <= token < self.vocab_size and bool(int(self._bitmask[row, token // 32]) >> (token % 32) & 1)
