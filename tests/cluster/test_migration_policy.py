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
