"""The speculation step of the engine: propose before scheduling, learn from what was accepted.

Pure Python: proposals are token lists set on each decoding request; the scheduler places them
in the step's token budget and the model runner verifies them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from punctual.config import SpeculativeConfig
from punctual.sched.scheduler import Scheduler, SchedulerOutput
from punctual.spec.length import AcceptanceTracker, choose_lengths
from punctual.spec.ngram import NgramProposer


@dataclass
class SpecStats:
    method: str
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verifications: int = 0  # request-steps that verified at least one proposal

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens produced per verifying request-step (accepted proposals + the token every step makes)."""
        return 1.0 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0


class Speculator:
    """Chooses what each decoding request verifies in the next step.

    `proposer` is the prompt-lookup proposer (built here) or a draft-model proposer (built by
    the engine, since it owns a model). Prompt lookup proposes first and the length is chosen
    from what it found; a draft model costs a forward per drafted token, so the length is
    chosen first and only that much is drafted.
    """

    def __init__(self, config: SpeculativeConfig, scheduler: Scheduler, proposer=None):
        if proposer is None:
            if config.speculative_method != "ngram":
                raise ValueError(f"speculative_method {config.speculative_method!r} needs its proposer")
            proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)
        self.config = config
        self.scheduler = scheduler
        self.proposer = proposer
        self.tracker = AcceptanceTracker()
        self.stats = SpecStats(config.speculative_method)

    def propose(self, scheduler: Scheduler) -> None:
        """Set `spec_token_ids` on every decoding request: proposals, cut to the chosen length."""
        max_k = self.config.num_speculative_tokens
        room: dict[str, int] = {}
        decoding = []
        for request in scheduler.running:
            request.spec_token_ids = []
            request.spec_draft_probs = None
            if request.is_prefilling:
                continue
            decoding.append(request)
            # Penalties depend on every earlier token, verified positions included: no speculation.
            if request.sampling_params.needs_penalties:
                continue
            k = min(max_k, request.max_output_tokens - request.num_output_tokens - 1)
            if k > 0:
                room[request.request_id] = k
        if self.proposer.name == "draft":
            self.proposer.retain({r.request_id for r in scheduler.running})
            lengths = self._lengths(room, decoding, self.proposer.step_time_s)
            wanted = [(r, lengths[r.request_id]) for r in decoding if lengths.get(r.request_id, 0) > 0]
            for request_id, proposal in self.proposer.propose(wanted).items():
                request = scheduler.requests[request_id]
                request.spec_token_ids = proposal.token_ids
                request.spec_draft_probs = proposal.probs
            return
        proposals = {}
        for request in decoding:
            if request.request_id in room:
                draft = self.proposer.propose(request.all_token_ids, room[request.request_id], request.request_id)
                if draft:
                    proposals[request.request_id] = draft
        lengths = self._lengths({rid: len(d) for rid, d in proposals.items()}, decoding, 0.0)
        for request in decoding:
            k = lengths.get(request.request_id, 0)
            if k:
                request.spec_token_ids = proposals[request.request_id][:k]

    def _lengths(self, available: dict[str, int], decoding: list, depth_cost_s: float) -> dict[str, int]:
        """Tokens to verify per request: all that is available (fixed), or SmartSpec's choice
        within the budget the step's prompt chunks leave."""
        if self.config.speculative_length != "adaptive" or not available:
            return dict(available)
        scheduler = self.scheduler
        prompt_tokens = scheduler.prompt_tokens_next_step(time.monotonic())
        room = scheduler.config.max_num_batched_tokens - len(decoding) - prompt_tokens
        return choose_lengths(available, {rid: self.tracker.rate(rid) for rid in available},
                              scheduler.cost_model, len(decoding) + prompt_tokens, len(decoding), depth_cost_s,
                              prompt_tokens=prompt_tokens, max_total=max(0, room))

    def record(self, plan: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        for item in plan.scheduled:
            item.request.spec_token_ids = []
            item.request.spec_draft_probs = None
            if not item.spec_token_ids:
                continue
            proposed = len(item.spec_token_ids)
            accepted = max(0, len(sampled.get(item.request.request_id, [])) - 1)
            self.tracker.observe(item.request.request_id, proposed, accepted)
            self.stats.num_proposed_tokens += proposed
            self.stats.num_accepted_tokens += accepted
            self.stats.num_verifications += 1

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
        self.proposer.forget(request_id)
