"""Moving KV between replicas (issue 17): transfer size and time against context length (raw and
int8), and the stall of a migrated stream against resuming it by recompute.

    python benchmarks/bench_kv_moves.py [--model builtin] [--contexts 128,512,1024] [--repeats 3]

Replicas run in this process (cluster/inprocess.py), so the numbers are the engine's and the
front end's own costs over loopback sockets, without Ray's process boundaries.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import statistics
import time

import punctual.cluster.launch
from punctual.cluster.client import ClusterClient
from punctual.cluster.inprocess import InProcessReplicas
from punctual.config import ClusterConfig, EngineConfig
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams

MOVE_AT = 8  # the stream is moved after this many tokens
TOKENS = 24


async def one_stream(client: ClusterClient, request_id: str, context: int, how: str) -> float:
    """The stall of the stream when it moves (its longest gap between tokens after the move,
    less its median gap): `how` is migrate or recompute."""
    arrivals: list[float] = []
    done = asyncio.Event()
    moved = asyncio.Event()

    def on_update(update):
        for out in update.outputs:
            if out.request_id == request_id:
                arrivals.extend([time.perf_counter()] * len(out.new_token_ids))
                if len(arrivals) >= MOVE_AT:
                    moved.set()
                if out.finish_reason is not None:
                    done.set()

    client._on_update = on_update
    prompt = [(7 * i + int(request_id[1:]) * 13) % 3000 + 10 for i in range(context)]
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    client.add_request(EngineCoreRequest(request_id, prompt, params, arrival_time=0.0))
    await moved.wait()
    at = len(arrivals)
    source = client.requests[request_id].replica_id
    if how == "migrate":
        assert await client.migrate(request_id, 1 - source, "bench")
    else:
        client.replicas[source].client.abort_requests([request_id])
        client.failover.resume_by_recompute(request_id, prefer=1 - source)
    await done.wait()
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]
    after = [b - a for a, b in zip(arrivals[at - 1:], arrivals[at:])]
    return max(after) - statistics.median(gaps)


def transfer_costs(core, request_id: str) -> dict:
    out = {}
    for int8 in (False, True):
        started = time.perf_counter()
        payload = core.export_kv(request_id, int8=int8)
        data = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
        seconds = time.perf_counter() - started
        key = "int8" if int8 else "raw"
        out[key] = {"blocks": payload.num_blocks, "bytes": len(data), "export_s": seconds,
                    "mb_per_s": len(data) / seconds / 1e6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--contexts", default="128,512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="migrate with the KV int8-compressed on the wire")
    args = parser.parse_args()
    punctual.cluster.launch.RayReplicas = InProcessReplicas
    config = EngineConfig.from_kwargs(args.model, kv_cache_memory="256MiB")
    client = ClusterClient(config, ClusterConfig(replicas=2, kv_transfer_int8=args.int8))
    results = []

    async def run() -> None:
        client.start()
        await client.attach(lambda update: None, lambda reason: None)
        n = 0
        for context in [int(c) for c in args.contexts.split(",")]:
            row = {"context": context, "migrate_stall_s": [], "recompute_stall_s": []}
            for _ in range(args.repeats):
                for how in ("migrate", "recompute"):
                    n += 1
                    row[f"{how}_stall_s"].append(await one_stream(client, f"r{n}", context, how))
            moves = [m for m in client.migrations if m["ok"]][-args.repeats:]
            row["migrate_record_downtime_s"] = statistics.median(m["downtime_s"] for m in moves)
            row["migrate_blocks"] = moves[-1]["precopy_blocks"] + moves[-1]["final_blocks"]
            row["final_blocks"] = moves[-1]["final_blocks"]
            results.append(row)
        await client.shutdown()

    asyncio.run(run())
    # Transfer size and export time, on an engine of its own (the replicas' threads are gone).
    from punctual.engine.core import EngineCore

    core = EngineCore(config)
    for row in results:
        prompt = [(5 * i) % 3000 + 10 for i in range(row["context"])]
        core.add_request(EngineCoreRequest("t", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), 0.0))
        while not core.scheduler.requests["t"].output_token_ids:
            core.step()
        row["transfer"] = transfer_costs(core, "t")
        core.abort_requests(["t"])
        core.step() if core.has_unfinished_requests() else None
    for row in results:
        for key in ("migrate_stall_s", "recompute_stall_s"):
            samples = sorted(row[key])
            row[key[:-2] + "_samples_s"] = samples
            row[key] = statistics.median(samples)
            # p99 by nearest rank: the largest sample below 100 repeats
            row[key[:-2] + "_p99_s"] = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
