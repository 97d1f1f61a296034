"""The speculation step of the engine: offer before scheduling, fill the plan, learn from what was accepted.

Pure Python: the scheduler chooses the lengths within the step's token budget, proposals are
written into the plan, and the model runner verifies them.
"""
from __future__ import annotations

from dataclasses import dataclass

from punctual.config import SpeculativeConfig
from punctual.plan import ModelRunnerOutput, StepPlan
from punctual.request import Request
from punctual.sched.cost_model import StepCostModel
from punctual.spec_decode.length import AcceptanceTracker, choose_lengths
from punctual.spec_decode.ngram import NgramProposer
from punctual.spec_decode.proposer import Proposer


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
    """Speculative decoding around the scheduler: what each decoding request could propose, how
    many of those to verify (chosen inside `Scheduler.schedule` through `choose_lengths`), the
    proposals written into the plan, and what verification accepted.

    Writes nothing onto `Request`: proposals travel in the step plan only.
    """

    def __init__(self, config: SpeculativeConfig, cost_model: StepCostModel, max_num_batched_tokens: int,
                 proposer: Proposer | None = None):
        if proposer is None:
            if config.speculative_method != "ngram":
                raise ValueError(f"speculative_method {config.speculative_method!r} needs its proposer")
            proposer = NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)
        self.config = config
        self.cost_model = cost_model
        self.max_num_batched_tokens = max_num_batched_tokens
        self.proposer = proposer
        self.tracker = AcceptanceTracker()
        self.stats = SpecStats(config.speculative_method)

    def available(self, running: list[Request]) -> dict[str, int]:
        """Request id -> proposal tokens each decoding request can offer this step."""
        max_k = self.config.num_speculative_tokens
        offers = {}
        for request in running:
            # Penalties depend on every earlier token, verified positions included: no speculation.
            if request.is_prefilling or request.sampling_params.needs_penalties:
                continue
            k = min(max_k, request.max_output_tokens - request.num_output_tokens - 1)
            if k > 0:
                k = self.proposer.available(request, k)
                if k > 0:
                    offers[request.request_id] = k
        return offers

    def choose_lengths(self, offers: dict[str, int], num_decodes: int, prompt_tokens: int,
                       room: int) -> dict[str, int]:
        """Tokens to verify per request: all that is offered (fixed), or SmartSpec's choice within
        the room that the step's decodes and prompt chunks leave. The scheduler calls this."""
        if self.config.speculative_length != "adaptive":
            return offers
        return choose_lengths(offers, {rid: self.tracker.rate(rid) for rid in offers}, self.cost_model,
                              num_decodes + prompt_tokens, num_decodes, self.proposer.depth_cost_s,
                              prompt_tokens=prompt_tokens, max_total=room)

    def fill(self, plan: StepPlan, requests: dict[str, Request]) -> None:
        """Write the proposals into the plan, up to the room the scheduler reserved for each."""
        wanted = [(requests[item.request_id], item.num_spec_reserved) for item in plan.scheduled
                  if item.num_spec_reserved > 0]
        if not wanted:
            return
        proposals = self.proposer.propose(wanted)
        for item in plan.scheduled:
            proposal = proposals.get(item.request_id)
            if proposal is not None and proposal.token_ids:
                item.spec_token_ids = proposal.token_ids[:item.num_spec_reserved]
                item.draft_probs = proposal.probs

    def record(self, plan: StepPlan, output: ModelRunnerOutput) -> None:
        for item in plan.scheduled:
            if not item.spec_token_ids:
                continue
            proposed = len(item.spec_token_ids)
            accepted = output.num_accepted(item)
            self.tracker.observe(item.request_id, proposed, accepted)
            self.stats.num_proposed_tokens += proposed
            self.stats.num_accepted_tokens += accepted
            self.stats.num_verifications += 1

    def forget(self, request_id: str) -> None:
        self.tracker.forget(request_id)
        self.proposer.forget(request_id)
