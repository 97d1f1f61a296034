"""Tensor parallelism with Ray: each replica of a cluster a group of ranks, and ranks placed by Ray
as actors (tensor_parallel_backend="ray", what a cluster joined with --ray-address uses), checked
on one local Ray instance: the same greedy tokens as one whole engine, a killed rank fails the
group cleanly, and nothing is left behind."""
from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path

import pytest

from hf_models import build_hf_checkpoint
from test_tensor_parallel import ENGINE, MAX_NEW, PROMPTS, gone
from punctual import LLM, SamplingParams
from punctual.runner.tensor_parallel import RankFailure
from waiting import wait_until

ray = pytest.importorskip("ray")

CPUS = 4  # two replicas of two ranks, one thread each


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module (its start takes seconds)."""
    ray.init(num_cpus=CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=80 << 20,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("tpray") / "gqa", "llama_gqa")  # 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def whole(gqa):
    """The greedy tokens of one engine holding the whole model."""
    llm = LLM(str(gqa), **ENGINE)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    finally:
        llm.engine.core.close()
    return [o.outputs[0].token_ids for o in outputs]


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def test_ray_backend_needs_a_connected_ray(gqa):
    if ray.is_initialized():
        pytest.skip("this process is connected to Ray")
    with pytest.raises(ValueError, match="needs this process connected to Ray"):
        LLM(str(gqa), tensor_parallel_size=2, tensor_parallel_backend="ray", **ENGINE)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_backend must be local|ray, got 'mpi'"):
        LLM("builtin-tiny", tensor_parallel_size=2, tensor_parallel_backend="mpi")


def test_plans_cross_as_declared_data_and_a_pickle_is_refused():
    """What a Ray rank reads from its TCP connection: the plan's data round-trips; a pickled frame
    (code a listener could be fed) does not decode."""
    from punctual.plan import KVCopyOrders, KVEviction, NewRequestData, ScheduledRequest, StepPlan
    from punctual.runner.rank_wire import decode_command, encode_command
    from punctual.wire.codec import WireError

    new = NewRequestData((1, 2, 3), (4,), SamplingParams(temperature=0, prompt_logprobs=1, stop_token_ids=[7]))
    plan = StepPlan([ScheduledRequest("a", [1, 2, 3], 0, (0, 1), True, new=new),
                     ScheduledRequest("b", [9], 5, (), True, is_decode=True, spec_token_ids=(3, 4), position_offset=4)],
                    ["gone"], KVCopyOrders(swap_out=[(1, 2)], swap_in=[(3, 4)]), [KVEviction("b", 0, 1, (2, 3))])
    kind, sent = decode_command(encode_command("execute", plan))
    assert kind == "execute"
    assert sent.scheduled[0].new.prompt_token_ids == (1, 2, 3) and sent.scheduled[0].new.output_token_ids == (4,)
    assert sent.scheduled[0].new.sampling_params.prompt_logprobs == 1
    assert sent.scheduled[0].new.sampling_params.stop_token_ids == [7]
    assert [(s.request_id, s.token_ids, s.start_position, tuple(s.new_block_ids), s.is_decode, tuple(s.spec_token_ids),
             s.position_offset) for s in sent.scheduled] == \
        [("a", [1, 2, 3], 0, (0, 1), False, (), 0), ("b", [9], 5, (), True, (3, 4), 4)]
    assert sent.finished_request_ids == ["gone"] and sent.kv_evictions == plan.kv_evictions
    assert sent.kv_copies.swap_out == [(1, 2)] and sent.kv_copies.swap_in == [(3, 4)]
    with pytest.raises(WireError):
        decode_command(pickle.dumps(("execute", plan)))


def actor_gone(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    return False


@pytest.mark.slow  # a local Ray instance (its start takes seconds)
def test_ranks_placed_by_ray_give_the_whole_models_tokens_and_leave_nothing(local_ray, gqa, whole):
    llm = LLM(str(gqa), tensor_parallel_size=2, tensor_parallel_backend="ray", **ENGINE)
    runner = llm.engine.core.runner
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
        llm.engine.core.check_integrity()
        (rank,) = runner.ranks
        assert rank.pid != os.getpid() and not gone(rank.pid)
        # One host: the ranks reduce through shared memory, as local ranks do.
        assert [stats["all_reduce"] for stats in runner.rank_stats()] == ["shm", "shm"]
    finally:
        llm.engine.core.close()
    assert [o.outputs[0].token_ids for o in outputs] == whole
    wait_until(lambda: gone(rank.pid), 30, "the rank actor's process outlived close()")
    assert actor_gone(rank.actor)
    # The placement group is removed (Ray frees its bundles in the background).
    wait_until(lambda: ray.available_resources().get("CPU") == CPUS, 30, "the ranks' CPUs were not released")


@pytest.mark.slow  # a local Ray instance (its start takes seconds)
def test_a_killed_rank_actor_fails_the_group_cleanly(local_ray, gqa):
    llm = LLM(str(gqa), tensor_parallel_size=2, tensor_parallel_backend="ray", **ENGINE)
    try:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], PARAMS, use_tqdm=False)
        (rank,) = llm.engine.core.runner.ranks
        ray.kill(rank.actor, no_restart=True)
        wait_until(lambda: gone(rank.pid), 30, "rank 1 still alive after ray.kill")
        with pytest.raises(RankFailure, match="rank 1"):
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], PARAMS, use_tqdm=False)
        with pytest.raises(RankFailure):  # the group stays failed
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], PARAMS, use_tqdm=False)
    finally:
        llm.engine.core.close()
    wait_until(lambda: ray.available_resources().get("CPU") == CPUS, 30, "the ranks' CPUs were not released")


@pytest.mark.slow  # a local Ray instance (its start takes seconds)
def test_ranks_needing_more_cpus_than_ray_has_are_refused(local_ray, gqa):
    with pytest.raises(ValueError, match=f"need 1 x 8 = 8 Ray CPUs.*has {CPUS}"):
        LLM(str(gqa), tensor_parallel_size=2, tensor_parallel_backend="ray", threads_per_rank=8, **ENGINE)


# ---- each replica of a cluster a tensor-parallel group ----------------------------------------------
def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of each live child of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                found.append((int(entry.name), cmdline))
    return found


def cluster_client(path, replicas: int, ray_address: str | None = None):
    from punctual.cluster.client import ClusterClient
    from punctual.config import ClusterConfig, EngineConfig

    config = EngineConfig.from_kwargs(str(path), tensor_parallel_size=2, **ENGINE)
    return ClusterClient(config, ClusterConfig(replicas=replicas, ray_address=ray_address))


def placement_groups() -> dict[str, str]:
    """Name -> state of this cluster's placement groups (removed ones included)."""
    return {g["name"]: g["state"] for g in ray.util.placement_group_table().values() if g["name"]}


@pytest.mark.slow
# None: a local cluster, each replica's ranks its own subprocesses; "auto": as on a cluster joined by
# address (the test's Ray), each replica and its ranks in a placement group, the ranks Ray actors.
@pytest.mark.parametrize("ray_address", [None, "auto"])
def test_two_replicas_of_two_ranks_give_the_whole_models_tokens(local_ray, gqa, whole, ray_address):
    from punctual.request import EngineCoreRequest

    client = cluster_client(gqa, 2, ray_address)
    tokens: dict[str, list[int]] = {}
    ranks: list[list[int]] = []
    groups: dict[str, str] = {}

    async def main():
        client.start()
        finished: set[str] = set()
        done = asyncio.Event()

        def on_update(update):
            for out in update.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finished.add(out.request_id)
                    if len(finished) == len(PROMPTS):
                        done.set()

        await client.attach(on_update, lambda reason: None)
        try:
            for i, prompt in enumerate(PROMPTS):
                client.add_request(EngineCoreRequest(f"r{i}", list(prompt), PARAMS, arrival_time=0.0))
            await asyncio.wait_for(done.wait(), 120)
            # Each replica's actor reserved its group's CPUs (2 ranks x 1 thread) and runs its rank 1 beside it.
            assert ray.available_resources().get("CPU", 0) == 0
            ranks.extend([pid for pid, cmd in children(r.pid) if "rank_main" in cmd] for r in client.replicas)
            groups.update(placement_groups())
        finally:
            await client.shutdown()
            await client.replica_set.stop_actors()

    asyncio.run(main())
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == whole
    if ray_address is None:
        assert [len(pids) for pids in ranks] == [1, 1] and "CREATED" not in groups.values()
    else:  # the ranks are Ray actors, not the replicas' children, in one placement group per replica
        assert ranks == [[], []]
        assert sorted(state for name, state in groups.items() if name.startswith("punctual-tp-")) == ["CREATED"] * 2
        wait_until(lambda: all(placement_groups()[name] == "REMOVED" for name in groups), 30,
                   "a replica's placement group outlived the cluster")
    wait_until(lambda: all(gone(pid) for pids in ranks for pid in pids), 30, "a replica's rank outlived its actor")
    wait_until(lambda: ray.available_resources().get("CPU") == CPUS, 30, "the replicas' CPUs were not released")


@pytest.mark.slow  # a local Ray instance (its start takes seconds)
def test_a_cluster_needing_more_cpus_than_ray_has_is_refused(local_ray, gqa):
    client = cluster_client(gqa, 3)
    with pytest.raises(RuntimeError, match=f"3 replicas of 2 CPUs each .* need 6 Ray CPUs; the Ray cluster has {CPUS}"):
        client.start()
