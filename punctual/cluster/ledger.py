"""Which replica holds which request, and the load that makes: the front end counts each
replica's running and waiting requests itself (exact and current: no report to wait for) and
routes by those counts with the KV numbers of the replica's latest report."""
from __future__ import annotations

import time

from punctual.cluster import migration as policy
from punctual.cluster.replica_set import ReplicaSet
from punctual.cluster.router import ReplicaLoad, make_router
from punctual.cluster.state import Replica, RoutedRequest
from punctual.request import EngineCoreOutput, EngineCoreRequest


class Ledger:
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas
        cluster, config = replicas.cluster, replicas.config
        self.block_size = config.cache.block_size
        # The router hashes prompts as the replicas do, or it would never see a prefix they hold.
        self.router = make_router(cluster.router, self.block_size, hash_algo=config.cache.prefix_caching_hash_algo,
                                  **cluster.router_options)
        self.requests: dict[str, RoutedRequest] = {}

    def route(self, request: EngineCoreRequest) -> Replica:
        """The replica the router picks among those taking prompts (NoReplicaAvailable if none)."""
        rid = self.router.route(request.prompt_token_ids, request.user, self.loads({"mixed", "prefill"}),
                                cache_salt=request.cache_salt,
                                adapter_id=None if request.lora_request is None else request.lora_request.adapter_id)
        self.router.on_request_routed(rid, len(request.prompt_token_ids))
        return self.replicas[rid]

    def send_to(self, replica: Replica, request: EngineCoreRequest) -> None:
        """Map the (already recorded) request to `replica` and hand it to that replica's core."""
        replica.request_ids.add(request.request_id)
        routed = self.requests[request.request_id]
        routed.replica_id, routed.held = replica.replica_id, False
        replica.client.add_request(request)

    def forget(self, request_id: str) -> RoutedRequest | None:
        """Drop a request (finished, rejected, aborted or lost) from the ledger and its replica."""
        routed = self.requests.pop(request_id, None)
        if routed is not None:
            self.replicas[routed.replica_id].request_ids.discard(request_id)
        return routed

    def loads(self, roles: set[str] | None = None) -> list[ReplicaLoad]:
        """Each replica's load as the front end counts it, with the KV numbers of its latest
        report. Draining replicas, and those whose role is not in `roles`, are unhealthy: nothing
        is routed there."""
        loads = []
        for r in self.replicas:
            running = waiting = queued = 0
            for request_id in r.request_ids:
                routed = self.requests[request_id]
                if routed.started:
                    running += 1
                else:
                    waiting += 1
                    queued += routed.num_tokens
            stats = r.client.stats if r.ready else None
            healthy = r.routable and (roles is None or r.role in roles)
            loads.append(ReplicaLoad(r.replica_id, healthy, running, waiting, queued,
                                     stats.kv_blocks_free if stats else 0, stats.kv_blocks_total if stats else 0,
                                     frozenset(stats.lora_adapters) if stats and stats.lora_adapters else frozenset()))
        return loads

    def observe_outputs(self, replica: Replica) -> None:
        """An update with outputs came from `replica`: the gap since its last is one decode step
        as the stream sees it (a smoothed estimate; a long gap was idle time, not a step)."""
        now = time.monotonic()
        replica.step_s = policy.observe_step_gap(replica.step_s, replica.last_output_at, now)
        replica.last_output_at = now

    def record_output(self, rid: int, output: EngineCoreOutput) -> RoutedRequest | None:
        """Account an output of replica `rid`; None when the request has left that replica (moved,
        resumed, aborted): the front end must not see it."""
        routed = self.requests.get(output.request_id)
        if routed is None or routed.replica_id != rid:
            return None
        routed.started = routed.started or bool(output.new_token_ids)
        routed.delivered.extend(output.new_token_ids)
        return routed

    def step_s(self) -> float:
        """The cluster's decode step time (the median of the replicas' latest estimates)."""
        return policy.cluster_step_s([r.step_s for r in self.replicas])

    def blocks_needed(self, routed: RoutedRequest) -> int:
        """KV blocks a request holds once done: its prompt and its whole output limit."""
        return policy.blocks_needed(len(routed.request.prompt_token_ids), routed.request.sampling_params.max_tokens,
                                    self.replicas.info.max_model_len, self.block_size)

    def remaining_tokens(self, routed: RoutedRequest) -> int:
        """Tokens a request may still generate (its output limit less what it made: an upper bound)."""
        limit = routed.request.sampling_params.max_tokens
        if limit is None:
            limit = self.replicas.info.max_model_len - len(routed.request.prompt_token_ids)
        return max(0, limit - len(routed.delivered))

    def check_integrity(self) -> None:
        self.router.check_integrity()
        for r in self.replicas:
            for request_id in r.request_ids:
                assert self.requests[request_id].replica_id == r.replica_id, f"{request_id} on two replicas"
        assert sum(len(r.request_ids) for r in self.replicas) == len(self.requests), "a request on no replica"
