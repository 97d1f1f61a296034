"""The tensor-parallel collectives: the shared-memory all-reduce and gather give gloo's results, the
same bits on every rank, and fail (never hang) when a peer is dead or stalls. Ranks are threads of
this process here (each maps the buffer itself, as a rank process does)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from punctual.models.collectives import CollectiveError, RankGroup

SLOT_BYTES = 1024  # small: the (40, 8) float32 input (1280 bytes) goes through gloo


def run_ranks(size: int, body, all_reduce: str, timeout_s: float = 60.0, peers_alive=None,
              deadline_s: float = 60.0) -> tuple[list, list]:
    """body(group) on `size` threads, each a rank of one group: (results, exceptions), rank order."""
    store = dist.HashStore()
    results, errors = [None] * size, [None] * size

    def rank_thread(rank: int) -> None:
        try:
            group = RankGroup(store, rank, size, timeout_s, all_reduce if rank == 0 else None,
                              peers_alive=peers_alive, shm_slot_bytes=SLOT_BYTES)
            results[rank] = body(group)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors[rank] = exc

    threads = [threading.Thread(target=rank_thread, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline_s)
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    return results, errors


def inputs(rank: int) -> list[torch.Tensor]:
    """This rank's partial sums: random, of the shapes and dtypes the decoder reduces, one strided,
    one larger than a slot."""
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(3, 8, generator=g), torch.randn(1, 5, generator=g),
            torch.randn(2, 16, generator=g).to(torch.bfloat16), torch.randn(8, 6, generator=g).t(),
            torch.randn(40, 8, generator=g)]


def collect(group: RankGroup) -> dict:
    mine = inputs(group.rank)
    return dict(kind=group.all_reduce_kind, sums=[group.all_reduce(x.clone()) for x in mine],
                gathered=[group.all_gather_columns(x) for x in mine[:3]], fallbacks=group.num_gloo_fallbacks)


@pytest.mark.parametrize("size", [2, 3])
def test_shared_memory_sums_are_glooes_and_the_same_on_every_rank(size):
    shm, errors = run_ranks(size, collect, "shm")
    assert errors == [None] * size
    gloo, errors = run_ranks(size, collect, "gloo")
    assert errors == [None] * size
    assert [r["kind"] for r in shm] == ["shm"] * size and [r["kind"] for r in gloo] == ["gloo"] * size
    assert [r["fallbacks"] for r in shm] == [1] * size  # the input larger than a slot, through gloo
    parts = [inputs(rank) for rank in range(size)]
    last = len(parts[0]) - 1  # the input larger than a slot
    for i, first in enumerate(shm[0]["sums"]):
        in_rank_order = parts[0][i].clone()
        for rank in range(1, size):
            in_rank_order += parts[rank][i]
        for rank in range(size):
            assert torch.equal(shm[rank]["sums"][i], first), (i, rank)  # the same bits everywhere
        if size == 2 or i == last:  # two addends (or gloo itself): no order to differ in
            assert torch.equal(first, gloo[0]["sums"][i]), i
        else:  # gloo adds three in its own order: a rounding apart (bf16's is 2^-8 of the value)
            tolerance = 0.03 if first.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(first, gloo[0]["sums"][i], rtol=tolerance, atol=tolerance)
        if i < last:
            assert torch.equal(first, in_rank_order), i
    for i in range(3):
        whole = torch.cat([parts[rank][i] for rank in range(size)], dim=-1)
        assert all(torch.equal(r["gathered"][i], whole) for r in shm + gloo), i


@pytest.mark.parametrize("cause", ["stalled", "dead"])
def test_a_missing_peer_fails_the_all_reduce_instead_of_hanging(cause):
    """Rank 1 does not come to the first all-reduce: rank 0's fails, after the timeout (stalled) or
    as soon as it learns the peer is dead; rank 1's next all-reduce fails too (the group is aborted)."""
    rank0_failed = threading.Event()

    def body(group: RankGroup):
        if group.rank == 1:
            assert rank0_failed.wait(30)
        try:
            return group.all_reduce(torch.ones(4))
        finally:
            rank0_failed.set()

    # Stalled: a short timeout, the peer alive; dead: a timeout longer than the test's deadline.
    timeout_s, alive = (0.5, lambda: True) if cause == "stalled" else (300.0, lambda: False)
    _, errors = run_ranks(2, body, "shm", timeout_s=timeout_s, peers_alive=alive, deadline_s=30)
    assert isinstance(errors[0], CollectiveError)
    assert ("did not reach the shared-memory exchange in 0.5 s" if cause == "stalled" else "a peer died") \
        in str(errors[0])
    assert "ranks [1]" in str(errors[0])
    assert isinstance(errors[1], CollectiveError) and "a peer failed" in str(errors[1])


def test_all_reduce_must_be_named():
    with pytest.raises(ValueError, match="all_reduce must be 'shm' or 'gloo', got 'nccl'"):
        RankGroup(dist.HashStore(), 0, 2, 5.0, "nccl")
