import pytest

from punctual.cluster.migration import least_loaded, pick_request, rebalance_pair
from punctual.cluster.router import ReplicaLoad


def load(rid, running, waiting=0, healthy=True):
    return ReplicaLoad(rid, healthy, running, waiting, 0, 10, 10)


def test_rebalance_only_beyond_threshold():
    assert rebalance_pair([load(0, 3), load(1, 1)], threshold=2) == (0, 1)
    assert rebalance_pair([load(0, 2), load(1, 1)], threshold=2) is None
    assert rebalance_pair([load(0, 5), load(1, 0, healthy=False)], threshold=2) is None
    assert rebalance_pair([load(0, 1), load(1, 4), load(2, 0)], threshold=3) == (1, 2)
    with pytest.raises(ValueError, match="threshold"):
        rebalance_pair([], threshold=1)


def test_a_move_never_comes_back():
    before = [load(0, 3), load(1, 1)]
    source, target = rebalance_pair(before, 2)
    after = [load(0, 2), load(1, 2)]
    assert rebalance_pair(after, 2) is None


def test_least_loaded_and_pick():
    loads = [load(0, 2), load(1, 1), load(2, 1, healthy=False)]
    assert least_loaded(loads) == 1
    assert least_loaded(loads, exclude=1) == 0
    assert least_loaded(loads, allowed={2}) is None
    assert pick_request({"a": 40, "b": 12, "c": 12}) == "b"
    assert pick_request({}) is None


def test_cluster_config_checks_the_disaggregation_fields():
    from punctual.config import ClusterConfig

    ClusterConfig(replicas=3, prefill_replicas=1, decode_replicas=2).validate()
    with pytest.raises(ValueError, match="prefill_replicas"):
        ClusterConfig(replicas=3, prefill_replicas=1, decode_replicas=1).validate()
    with pytest.raises(ValueError, match="decode_replicas"):
        ClusterConfig(replicas=2, prefill_replicas=2).validate()
    with pytest.raises(ValueError, match="migration_threshold"):
        ClusterConfig(replicas=2, migration_threshold=1).validate()


def test_transfer_cost_learns_a_line_and_a_bandwidth():
    from punctual.cluster.migration import TransferCost

    cost = TransferCost()
    prior = cost.predict(10)
    for blocks in (1, 8, 30, 2, 16, 64, 4):
        cost.observe(blocks, 0.004 + 0.0002 * blocks, nbytes=blocks * 100_000)
    assert cost.predict(10) != prior
    assert abs(cost.fixed_s - 0.004) < 1e-6 and abs(cost.per_block_s - 0.0002) < 1e-7
    assert abs(cost.as_dict()["mb_per_s"] - 500) < 1e-3  # 0.1 MB per block in 0.2 ms
    same = TransferCost()
    for _ in range(5):  # rounds all of one size: the rate is what is left after the prior's fixed part
        same.observe(10, 0.03)
    assert abs(same.predict(10) - 0.03) < 1e-9


def test_a_rebalancing_move_must_earn_its_transfer():
    from punctual.cluster.migration import rebalance_gain_s

    # 4 running against 0: a step there costs 1/4 of one here, so each token left saves 3/4 step.
    assert rebalance_gain_s(100, 0.04, 4, 0) == pytest.approx(3.0)
    assert rebalance_gain_s(100, None, 4, 0) == float("inf")  # no step time seen yet: no objection
    assert rebalance_gain_s(100, 0.04, 2, 1) == 0.0  # no gap a move narrows
    candidates = {"almost-done": 40, "long": 400}
    gains = {"almost-done": rebalance_gain_s(2, 0.04, 4, 0), "long": rebalance_gain_s(300, 0.04, 4, 0)}
    transfer = {"almost-done": 0.02, "long": 0.2}
    assert pick_request(candidates) == "almost-done"  # fewest tokens, ignoring cost
    # The almost-done one would save 2 tokens x 30 ms = 60 ms... more than its 20 ms copy; make it 1 token.
    gains["almost-done"] = rebalance_gain_s(1, 0.04, 4, 0)  # 30 ms saved against a 20 ms copy: still worth it
    assert pick_request(candidates, transfer, gains) == "almost-done"
    transfer["almost-done"] = 0.05  # a copy slower than what it saves: the long one goes instead
    assert pick_request(candidates, transfer, gains) == "long"
    assert pick_request(candidates, {"almost-done": 1.0, "long": 10.0}, gains) is None


def test_decode_replica_choice_weighs_the_transfer():
    from punctual.cluster.migration import pick_decode

    loads = [load(0, 0), load(1, 2), load(2, 3)]
    # Same transfer everywhere: the least loaded decode replica.
    assert pick_decode(loads, {1, 2}, {1: 0.01, 2: 0.01}, step_s=0.05) == 1
    # Replica 2 shares the prefill replica's host (a cheap copy) and that outweighs one more request.
    assert pick_decode(loads, {1, 2}, {1: 0.2, 2: 0.01}, step_s=0.05) == 2
    assert pick_decode(loads, {3}, {}, step_s=0.05) is None


def test_room_move_picks_the_least_important_and_a_replica_it_fits():
    from punctual.cluster.migration import Seat, room_move

    loads = [ReplicaLoad(0, True, 2, 0, 0, 0, 64), ReplicaLoad(1, True, 1, 0, 0, 0, 64),
             ReplicaLoad(2, True, 0, 0, 0, 0, 32)]
    seats = {0: [Seat("a", 5, 30, True), Seat("b", 3, 20, True)], 1: [Seat("c", 0, 40, True)], 2: []}
    assert room_move(0, 10, 0, seats, loads) is None  # 30 + 20 + 10 fit in 64
    # 30 + 20 + 30 = 80: 16 short. "a" (priority 5) goes; only replica 2 (32 blocks) has room for 30.
    assert room_move(0, 30, 0, seats, loads) == ("a", 2)
    assert room_move(5, 30, 0, seats, loads) is None  # nobody there is less important than priority 5
    assert room_move(4, 30, 0, seats, loads) == ("a", 2)
    seats[0][0] = Seat("a", 5, 30, False)  # already moving, or not started: not movable
    assert room_move(0, 30, 0, seats, loads) == ("b", 2)  # the next less important, and its 20 blocks cover 16
    seats[1].append(Seat("e", 0, 10, True))
    seats[2] = [Seat("d", 0, 20, True)]  # now no replica has room for b's 20 (14 and 12 left): no move helps
    assert room_move(0, 30, 0, seats, loads) is None
