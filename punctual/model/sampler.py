"""Logits -> tokens: penalties, greedy or temperature sampling with top-k/top-p/min-p, logprobs.

Seeded requests draw from their own generator, so their samples do not depend on what else
shared the batch; the rest share the engine's generator.
"""
from __future__ import annotations

import torch

from punctual.request import Request, TokenLogprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator_for(self, request: Request) -> torch.Generator:
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(request.sampling_params.seed)
            self._request_generators[request.request_id] = gen
        return gen

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [S, V] float32, one row per request. Returns token ids and per-row logprobs."""
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(p.needs_penalties for p in params):
            logits = logits.clone()
            for i, request in enumerate(requests):
                if request.sampling_params.needs_penalties:
                    self._apply_penalties(logits[i], request)

        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        random = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            tokens[index] = logits[index].argmax(dim=-1)
        if random:
            index = torch.tensor(random, device=logits.device)
            probs = self._probs([params[i] for i in random], logits[index])
            seeded = [j for j, i in enumerate(random) if params[i].seed is not None]
            unseeded = [j for j, i in enumerate(random) if params[i].seed is None]
            drawn = torch.empty(len(random), dtype=torch.long, device=logits.device)
            for j in seeded:
                drawn[j] = torch.multinomial(probs[j], 1, generator=self._generator_for(requests[random[j]]))[0]
            if unseeded:
                rows = torch.tensor(unseeded, device=logits.device)
                drawn[rows] = torch.multinomial(probs[rows], 1, generator=self.generator)[:, 0]
            tokens[index] = drawn

        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[i] = self._token_logprobs(raw_logprobs[i], token_list[i], p.logprobs)
        return token_list, logprobs

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, request: Request, drafts: list[int],
               draft_probs: torch.Tensor | None = None) -> tuple[list[int], list[TokenLogprobs] | None]:
        """Speculative verification. logits: [len(drafts)+1, V], row i predicts the token after draft i-1.

        Returns the accepted drafts and one more token. Greedy accepts a draft iff it is the argmax.
        Sampling is rejection sampling (Leviathan et al., Chen et al.): draft d, drawn from the
        proposer's distribution q (row i of `draft_probs`; None for a deterministic proposer such
        as prompt lookup, i.e. q is a point mass on d), is accepted with probability
        min(1, p(d) / q(d)); on rejection the token is drawn from max(0, p - q), renormalised.
        Either way the token follows p exactly.
        """
        params = request.sampling_params
        tokens: list[int] = []
        if params.greedy:
            tokens = accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
        else:
            probs = self._probs([params] * logits.shape[0], logits)
            gen = self._generator_for(request) if params.seed is not None else self.generator
            for i, draft in enumerate(drafts):
                q = None if draft_probs is None else draft_probs[i].to(probs.dtype)
                accept = probs[i, draft] if q is None else (probs[i, draft] / q[draft]).clamp(max=1.0)
                if torch.rand((), generator=gen, device=logits.device) < accept:
                    tokens.append(draft)
                    continue
                if q is None:
                    residual = probs[i].clone()
                    residual[draft] = 0.0
                else:
                    residual = (probs[i] - q).clamp(min=0.0)
                if residual.sum() <= 0:  # p == q where it matters: cannot happen after a reject
                    residual = probs[i]
                tokens.append(int(torch.multinomial(residual, 1, generator=gen)[0]))
                break
            else:
                tokens.append(int(torch.multinomial(probs[len(drafts)], 1, generator=gen)[0]))
        logprobs = None
        if params.logprobs is not None:
            raw = torch.log_softmax(logits, dim=-1)
            logprobs = [self._token_logprobs(raw[i], token, params.logprobs) for i, token in enumerate(tokens)]
        return tokens, logprobs

    @staticmethod
    def _token_logprobs(row: torch.Tensor, token: int, top_k: int) -> TokenLogprobs:
        top = []
        if top_k > 0:
            values, ids = row.topk(top_k)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprobs(token, row[token].item(), top)

    @staticmethod
    def _apply_penalties(row: torch.Tensor, request: Request) -> None:
        p = request.sampling_params
        if p.repetition_penalty != 1.0:
            # transformers' rule over prompt and output: shrink positive logits, grow negative ones.
            seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
            # OpenAI's rule over generated tokens only.
            out = torch.tensor(request.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty

    @staticmethod
    def _probs(params: list, logits: torch.Tensor) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        if any(p.needs_top_filters for p in params):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params],
                                 device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
            min_p = torch.tensor([p.min_p for p in params], device=logits.device, dtype=logits.dtype)
            # Drop a token when the tokens ranked above it already cover top_p of the mass.
            drop = (rank >= top_k[:, None]) | (sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None])
            drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
            drop[:, 0] = False  # the most likely token always survives
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return logits.softmax(dim=-1)


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Greedy verification: targets[i] is the argmax after draft i-1. The drafts that match the
    argmax are kept, then the first argmax that differs (or the one after the last draft)."""
    for i, draft in enumerate(drafts):
        if targets[i] != draft:
            return targets[:i + 1]
    return targets[:len(drafts) + 1]
