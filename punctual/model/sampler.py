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
        if request.sampling_params.greedy:
            tokens = accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
            return tokens, self.verified_logprobs(logits, request, tokens)
        return self.verify_sampled(logits, [(0, request, drafts, draft_probs)])[0]

    @torch.inference_mode()
    def verify_sampled(self, logits: torch.Tensor, items: list[tuple[int, Request, list[int], torch.Tensor | None]]
                       ) -> list[tuple[list[int], list[TokenLogprobs] | None]]:
        """`verify` for several sampling requests at once: item (row, request, drafts, draft_probs)
        owns logits rows row..row+len(drafts). The distributions of every row are computed in one
        call and the p(d) of every draft read in one gather, so a step's cost does not grow by a
        dozen small vocabulary-wide operations per request."""
        dev = logits.device
        rows: list[int] = []
        row_params = []
        for first, request, drafts, _ in items:
            rows.extend(range(first, first + len(drafts) + 1))
            row_params.extend([request.sampling_params] * (len(drafts) + 1))
        probs = self._probs(row_params, logits[torch.tensor(rows, device=dev)])
        draft_rows, draft_tokens, bases, base = [], [], [], 0
        for _, _, drafts, _ in items:
            bases.append(base)
            draft_rows.extend(range(base, base + len(drafts)))
            draft_tokens.extend(drafts)
            base += len(drafts) + 1
        p_drafts = probs[torch.tensor(draft_rows, device=dev), torch.tensor(draft_tokens, device=dev)].tolist() \
            if draft_rows else []

        accepted: list[list[int]] = []
        finals: list[torch.Tensor] = []  # per item: the distribution its last token is drawn from
        offset = 0
        for (_, request, drafts, q), b in zip(items, bases):
            gen = self._generator_for(request) if request.sampling_params.seed is not None else self.generator
            uniforms = torch.rand(len(drafts), generator=gen, device=dev).tolist()
            tokens: list[int] = []
            final = probs[b + len(drafts)]  # every draft accepted: the next token is drawn from p
            for i, draft in enumerate(drafts):
                p_d = p_drafts[offset + i]
                accept = p_d if q is None else min(1.0, p_d / float(q[i, draft]))
                if uniforms[i] < accept:
                    tokens.append(draft)
                    continue
                if q is None:
                    residual = probs[b + i].clone()
                    residual[draft] = 0.0
                else:
                    residual = (probs[b + i] - q[i].to(probs.dtype)).clamp(min=0.0)
                final = residual if residual.sum() > 0 else probs[b + i]  # p == q where it matters: cannot happen
                break
            offset += len(drafts)
            accepted.append(tokens)
            finals.append(final)

        drawn: list[int] = [0] * len(items)
        shared = [j for j, (_, r, _, _) in enumerate(items) if r.sampling_params.seed is None]
        for j, (_, request, _, _) in enumerate(items):
            if request.sampling_params.seed is not None:
                drawn[j] = int(torch.multinomial(finals[j], 1, generator=self._generator_for(request))[0])
        if shared:
            picks = torch.multinomial(torch.stack([finals[j] for j in shared]), 1, generator=self.generator)[:, 0]
            for j, token in zip(shared, picks.tolist()):
                drawn[j] = token

        out = []
        for (first, request, drafts, _), tokens, token in zip(items, accepted, drawn):
            tokens.append(token)
            out.append((tokens, self.verified_logprobs(logits[first:first + len(drafts) + 1], request, tokens)))
        return out

    def verified_logprobs(self, logits: torch.Tensor, request: Request, tokens: list[int]
                           ) -> list[TokenLogprobs] | None:
        top_k = request.sampling_params.logprobs
        if top_k is None:
            return None
        raw = torch.log_softmax(logits[:len(tokens)], dim=-1)
        return [self._token_logprobs(raw[i], token, top_k) for i, token in enumerate(tokens)]

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
        if not any(p.needs_top_filters for p in params):
            return logits.softmax(dim=-1)
        top_ks = [p.top_k for p in params]
        if all(0 < k <= TOP_K_WITHOUT_SORT for k in top_ks):
            # Every row keeps at most max(k) tokens: rank only those (topk) instead of sorting the
            # whole vocabulary, which took most of a sampled step (49k entries per row).
            ranked_logits, order = logits.topk(max(top_ks), dim=-1)
            ranked_probs = (ranked_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
            kept = ranked_logits.masked_fill(_dropped(params, ranked_probs, logits.shape[-1]), float("-inf"))
            return torch.zeros_like(logits).scatter_(-1, order, kept.softmax(dim=-1))
        ranked_logits, order = logits.sort(dim=-1, descending=True)
        ranked_probs = ranked_logits.softmax(dim=-1)
        kept = ranked_logits.masked_fill(_dropped(params, ranked_probs, logits.shape[-1]), float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, kept).softmax(dim=-1)


TOP_K_WITHOUT_SORT = 1024


def _dropped(params: list, ranked_probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Which of the ranked tokens (best first; probabilities over the whole vocabulary) top-k,
    top-p and min-p drop."""
    dev = ranked_probs.device
    rank = torch.arange(ranked_probs.shape[-1], device=dev)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=ranked_probs.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=ranked_probs.dtype)
    # Drop a token when the tokens ranked above it already cover top_p of the mass.
    drop = (rank >= top_k[:, None]) | (ranked_probs.cumsum(-1) - ranked_probs >= top_p[:, None])
    drop |= ranked_probs < min_p[:, None] * ranked_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return drop


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Greedy verification: targets[i] is the argmax after draft i-1. The drafts that match the
    argmax are kept, then the first argmax that differs (or the one after the last draft)."""
    for i, draft in enumerate(drafts):
        if targets[i] != draft:
            return targets[:i + 1]
    return targets[:len(drafts) + 1]
