"""Logits -> tokens: logit bias, penalties, greedy or temperature sampling with top-k/top-p/min-p, logprobs.

Seeded requests draw from their own generator, so their samples do not depend on what else
shared the batch; the rest share the engine's generator.
"""
from __future__ import annotations

import torch

from punctual.runner.request_state import RequestState
from punctual.request import TokenLogprobs

__all__ = ["RequestState", "Sampler", "accept_greedy", "add_logit_bias", "draw", "with_logit_bias"]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, kernels=None):
        """`kernels`: torch.ops.punctual where the fused CPU kernels run (their argmax_rows), else None."""
        self.device = device
        self.kernels = kernels
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator_for(self, request: RequestState) -> torch.Generator:
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(request.sampling_params.seed)
            self._request_generators[request.request_id] = gen
        return gen

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax, exactly torch's (first index of the maximum; NaN counts as largest):
        the fused kernel reads fp32 CPU logits ~7x faster than torch's CPU argmax (BENCHMARKS.md
        section 11)."""
        if self.kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
            return self.kernels.argmax_rows(logits)
        return logits.argmax(dim=-1)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[RequestState]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [S, V] float32, one row per request. Returns token ids and per-row logprobs."""
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        biased = [(i, 1, r) for i, r in enumerate(requests) if r.sampling_params.logit_bias]
        if biased or any(p.needs_penalties for p in params):
            logits = logits.clone()  # the caller's logits (and raw_logprobs) stay the model's
            if biased:  # before the penalties, as vLLM orders them (repetition's rule depends on the sign)
                add_logit_bias(logits, biased)
            for i, request in enumerate(requests):
                if request.sampling_params.needs_penalties:
                    self._apply_penalties(logits[i], request)

        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        random = [i for i, p in enumerate(params) if not p.greedy]
        if greedy and not random:  # every row greedy: no row selection (a copy of the logits) needed
            tokens = self.argmax(logits)
        elif greedy:
            index = torch.tensor(greedy, device=logits.device)
            tokens[index] = self.argmax(logits[index])
        if random:
            for group in _by_representation([params[i] for i in random]):
                rows = [random[j] for j in group]
                index = torch.tensor(rows, device=logits.device)
                probs, ids = self._candidates([params[i] for i in rows], logits[index])
                drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
                unseeded = []
                for j, i in enumerate(rows):
                    if params[i].seed is not None:
                        drawn[j] = draw(probs[j:j + 1], self._generator_for(requests[i]))[0]
                    else:
                        unseeded.append(j)
                if unseeded:
                    at = torch.tensor(unseeded, device=logits.device)
                    drawn[at] = draw(probs[at], self.generator)
                tokens[index] = drawn if ids is None else ids.gather(1, drawn[:, None])[:, 0]

        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[i] = self._token_logprobs(raw_logprobs[i], token_list[i], p.logprobs)
        return token_list, logprobs

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, request: RequestState, drafts: list[int],
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
            tokens = accept_greedy(self.argmax(with_logit_bias(logits, [(0, len(drafts) + 1, request)])).tolist(),
                                   drafts)
            return tokens, self.verified_logprobs(logits, request, tokens)
        return self.verify_sampled(logits, [(0, request, drafts, draft_probs)])[0]

    @torch.inference_mode()
    def verify_sampled(self, logits: torch.Tensor, items: list[tuple[int, RequestState, list[int], torch.Tensor | None]]
                       ) -> list[tuple[list[int], list[TokenLogprobs] | None]]:
        """`verify` for several sampling requests at once: item (row, request, drafts, draft_probs)
        owns logits rows row..row+len(drafts). The distributions of every row are computed in one
        call and the p(d) of every draft read in one gather, so a step's cost does not grow by a
        dozen small vocabulary-wide operations per request."""
        out: list = [None] * len(items)
        keys = [(_representation(r.sampling_params), q is None) for _, r, _, q in items]
        for key in dict.fromkeys(keys):
            group = [j for j, k in enumerate(keys) if k == key]
            for j, result in zip(group, self._verify_group(logits, [items[j] for j in group])):
                out[j] = result
        return out

    def _verify_group(self, logits: torch.Tensor, items: list) -> list[tuple[list[int], list[TokenLogprobs] | None]]:
        dev = logits.device
        rows: list[int] = []
        row_params = []
        for first, request, drafts, _ in items:
            rows.extend(range(first, first + len(drafts) + 1))
            row_params.extend([request.sampling_params] * (len(drafts) + 1))
        row_logits = logits[torch.tensor(rows, device=dev)]  # a copy: biased in place, `logits` stays raw
        bases, base = [], 0
        for _, _, drafts, _ in items:
            bases.append(base)
            base += len(drafts) + 1
        add_logit_bias(row_logits, [(b, len(drafts) + 1, request) for b, (_, request, drafts, _) in zip(bases, items)
                                    if request.sampling_params.logit_bias])
        if any(q is not None for _, _, _, q in items):
            # A draft model's q is over the whole vocabulary: so must p be, to take max(0, p - q).
            probs, ids = self._probs(row_params, row_logits), None
        else:
            probs, ids = self._candidates(row_params, row_logits)
        draft_rows, draft_tokens = [], []
        for (_, _, drafts, _), b in zip(items, bases):
            draft_rows.extend(range(b, b + len(drafts)))
            draft_tokens.extend(drafts)
        p_drafts: list[float] = []
        if draft_rows:
            index, tokens_t = torch.tensor(draft_rows, device=dev), torch.tensor(draft_tokens, device=dev)
            if ids is None:
                p_drafts = probs[index, tokens_t].tolist()
            else:  # a draft outside a row's candidates has probability 0
                p_drafts = (probs[index] * (ids[index] == tokens_t[:, None])).sum(dim=-1).tolist()

        accepted: list[list[int]] = []
        finals: list[int] = []  # per item: the row of `probs` its last token is drawn from
        residuals: dict[int, torch.Tensor] = {}  # item -> the distribution after a rejection
        offset = 0
        for j, ((_, request, drafts, q), b) in enumerate(zip(items, bases)):
            gen = self._generator_for(request) if request.sampling_params.seed is not None else self.generator
            uniforms = torch.rand(len(drafts), generator=gen, device=dev).tolist()
            tokens: list[int] = []
            final = b + len(drafts)  # every draft accepted: the next token is drawn from p
            for i, draft in enumerate(drafts):
                p_d = p_drafts[offset + i]
                accept = p_d if q is None else min(1.0, p_d / float(q[i, draft]))
                if uniforms[i] < accept:
                    tokens.append(draft)
                    continue
                final = b + i
                if q is None:
                    residual = probs[b + i].clone()
                    if ids is None:
                        residual[draft] = 0.0
                    else:
                        residual[ids[b + i] == draft] = 0.0
                else:
                    residual = (probs[b + i] - q[i].to(probs.dtype)).clamp(min=0.0)
                if residual.sum() > 0:  # p == q where it matters cannot happen after a rejection
                    residuals[j] = residual
                break
            offset += len(drafts)
            accepted.append(tokens)
            finals.append(final)

        final_probs = torch.stack([residuals[j] if j in residuals else probs[finals[j]] for j in range(len(items))])
        picks = torch.empty(len(items), dtype=torch.long, device=dev)
        shared = [j for j, (_, r, _, _) in enumerate(items) if r.sampling_params.seed is None]
        for j, (_, request, _, _) in enumerate(items):
            if request.sampling_params.seed is not None:
                picks[j] = draw(final_probs[j:j + 1], self._generator_for(request))[0]
        if shared:
            shared_t = torch.tensor(shared, device=dev)
            picks[shared_t] = draw(final_probs[shared_t], self.generator)
        if ids is not None:
            picks = ids[torch.tensor(finals, device=dev)].gather(1, picks[:, None])[:, 0]
        drawn = picks.tolist()

        out = []
        for (first, request, drafts, _), tokens, token in zip(items, accepted, drawn):
            tokens.append(token)
            out.append((tokens, self.verified_logprobs(logits[first:first + len(drafts) + 1], request, tokens)))
        return out

    def verified_logprobs(self, logits: torch.Tensor, request: RequestState, tokens: list[int]
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
    def _apply_penalties(row: torch.Tensor, request: RequestState) -> None:
        p = request.sampling_params
        if p.repetition_penalty != 1.0:
            # transformers' rule over prompt and output: shrink positive logits, grow negative ones.
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(request.seen, penalised, row))
        if p.presence_penalty or p.frequency_penalty:
            # OpenAI's rule over generated tokens only.
            counts = request.output_counts.to(row.dtype)
            row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty

    @staticmethod
    def _probs(params: list, logits: torch.Tensor) -> torch.Tensor:
        """[R, V] probabilities after temperature, top-k, top-p and min-p."""
        probs, ids = Sampler._candidates(params, logits)
        if ids is None:
            return probs
        return torch.zeros_like(logits).scatter_(-1, ids, probs)

    @staticmethod
    def _candidates(params: list, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same distributions, as ([R, C] probabilities, [R, C] their token ids) when every row
        has a top-k of at most TOP_K_WITHOUT_SORT (C = the largest k), else ([R, V], None).

        With top-k, only the k best tokens are ranked (topk) instead of sorting the vocabulary,
        and drawing and verification work on those C columns: at 49k tokens a row, the sort and
        the vocabulary-wide draws took most of a sampled step."""
        temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        if not any(p.needs_top_filters for p in params):
            return logits.softmax(dim=-1), None
        top_ks = [p.top_k for p in params]
        vocab_size = logits.shape[-1]
        if all(0 < k <= TOP_K_WITHOUT_SORT for k in top_ks):
            ranked_logits, order = logits.topk(min(max(top_ks), vocab_size), dim=-1)
            ranked_probs = None
            if any(p.top_p < 1.0 or p.min_p > 0.0 for p in params):  # mass over the whole vocabulary
                ranked_probs = (ranked_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
            kept = ranked_logits.masked_fill(_dropped(params, ranked_probs, ranked_logits.shape[-1], vocab_size),
                                             float("-inf"))
            return kept.softmax(dim=-1), order
        ranked_logits, order = logits.sort(dim=-1, descending=True)
        kept = ranked_logits.masked_fill(_dropped(params, ranked_logits.softmax(dim=-1), vocab_size, vocab_size),
                                         float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, kept).softmax(dim=-1), None


TOP_K_WITHOUT_SORT = 1024


def _representation(params) -> int | None:
    """How a row's distribution is held: over its top-k candidates (k) or the whole vocabulary
    (None). Rows are grouped by it, so a seeded request draws the same token whatever shares its
    batch: its columns, and so the token a uniform lands on, depend only on its own parameters."""
    return params.top_k if 0 < params.top_k <= TOP_K_WITHOUT_SORT and params.needs_top_filters else None


def _by_representation(params: list) -> list[list[int]]:
    keys = [_representation(p) for p in params]
    return [[i for i, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)]


def _dropped(params: list, ranked_probs: torch.Tensor | None, num_ranked: int, vocab_size: int) -> torch.Tensor:
    """Which of the `num_ranked` best tokens top-k, top-p and min-p drop. ranked_probs: their
    probabilities over the whole vocabulary, best first (None when no row has top-p or min-p)."""
    dev = ranked_probs.device if ranked_probs is not None else None
    rank = torch.arange(num_ranked, device=dev)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=dev)
    drop = rank >= top_k[:, None]
    if ranked_probs is not None:
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=ranked_probs.dtype)
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=ranked_probs.dtype)
        # Drop a token when the tokens ranked above it already cover top_p of the mass.
        drop |= ranked_probs.cumsum(-1) - ranked_probs >= top_p[:, None]
        drop |= ranked_probs < min_p[:, None] * ranked_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return drop


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [R, V] (non-negative, not necessarily normalised), by inverting
    the cumulative distribution: one uniform per row and a binary search. torch.multinomial took
    0.75 ms per 49k-token row on this CPU, this about 0.02 ms. A token of probability 0 is never
    drawn: the search returns the first index whose cumulative mass exceeds the uniform, which
    is always a token that adds mass."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    picks = torch.searchsorted(cdf, u, right=True)[:, 0]
    # u * total may round up to total itself (odds ~1e-7): take the row's most likely token then.
    overflow = picks >= probs.shape[-1]
    if bool(overflow.any()):
        picks = torch.where(overflow, probs.argmax(dim=-1), picks)
    return picks


def with_logit_bias(logits: torch.Tensor, spans: list[tuple[int, int, RequestState]]) -> torch.Tensor:
    """`logits` with each request's logit_bias added to its rows: a copy when a span's request has
    a bias, else `logits` itself (no copy for a step without one)."""
    spans = [span for span in spans if span[2].sampling_params.logit_bias]
    if not spans:
        return logits
    logits = logits.clone()
    add_logit_bias(logits, spans)
    return logits


def add_logit_bias(logits: torch.Tensor, spans: list[tuple[int, int, RequestState]]) -> None:
    """Add, in place, each span's request's logit_bias to logits rows first..first+num_rows (span:
    (first, num_rows, request); every request in `spans` has a bias, and is a RequestState, which
    holds it as tensors). One scatter for the whole
    step: the rows of requests without a bias are not touched."""
    if not spans:
        return
    dev = logits.device
    rows, cols, values = [], [], []
    for first, num_rows, request in spans:
        ids = request.bias_token_ids
        rows.append(torch.arange(first, first + num_rows, device=dev).repeat_interleave(len(ids)))
        cols.append(ids.repeat(num_rows))
        values.append(request.bias_values.repeat(num_rows))
    # accumulate: a bias adds to the logit (OpenAI's definition); each (row, token) appears once.
    logits.index_put_((torch.cat(rows), torch.cat(cols)), torch.cat(values).to(logits.dtype), accumulate=True)


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Greedy verification: targets[i] is the argmax after draft i-1. The drafts that match the
    argmax are kept, then the first argmax that differs (or the one after the last draft)."""
    for i, draft in enumerate(drafts):
        if targets[i] != draft:
            return targets[:i + 1]
    return targets[:len(drafts) + 1]
