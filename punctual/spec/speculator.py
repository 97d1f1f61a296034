"""The speculation step of the engine: propose before scheduling, learn from what was accepted.

Pure Python: proposals are token lists set on each decoding request; the scheduler places them
in the step's token budget and the model runner verifies them.
"""
from __future__ import annotations

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
    def __init__(self, config: SpeculativeConfig, scheduler: Scheduler):
        if config.speculative_method != "ngram":
            raise ValueError(f"speculative_method {config.speculative_method!r} is not supported: use ngram")
        self.config = config
        self.scheduler = scheduler
        self.proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)
        self.tracker = AcceptanceTracker()
        self.stats = SpecStats(config.speculative_method)

    def propose(self, scheduler: Scheduler) -> None:
        """Set `spec_token_ids` on every decoding request: proposals, cut to the chosen length."""
        max_k = self.config.num_speculative_tokens
        proposals: dict[str, list[int]] = {}
        decoding = []
        for request in scheduler.running:
            request.spec_token_ids = []
            if request.is_prefilling:
                continue
            decoding.append(request)
            # Penalties depend on every earlier token, verified positions included: no speculation.
            if request.sampling_params.needs_penalties:
                continue
            room = min(max_k, request.max_output_tokens - request.num_output_tokens - 1)
            if room > 0:
                draft = self.proposer.propose(request.all_token_ids, room)
                if draft:
                    proposals[request.request_id] = draft
        if not proposals:
            return
        if self.config.speculative_length == "adaptive":
            budget = scheduler.config.max_num_batched_tokens
            prefill = sum(r.num_tokens - r.num_computed_tokens for r in scheduler.running if r.is_prefilling)
            prefill += sum(r.num_tokens for r in scheduler.waiting)
            base = min(budget, len(decoding) + prefill)
            lengths = choose_lengths({rid: len(d) for rid, d in proposals.items()},
                                     {rid: self.tracker.rate(rid) for rid in proposals},
                                     scheduler.cost_model, base, len(decoding))
        else:
            lengths = {rid: len(d) for rid, d in proposals.items()}
        for request in decoding:
            k = lengths.get(request.request_id, 0)
            if k:
                request.spec_token_ids = proposals[request.request_id][:k]

    def record(self, plan: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        for item in plan.scheduled:
            item.request.spec_token_ids = []
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
