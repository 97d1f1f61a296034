"""KV transports between replicas (issue 17): a move's copy time and bandwidth against context
length, for each transport (relay through the front end, Ray's object store, shared memory
between the two replica processes), raw and int8, on Ray replicas.

    python benchmarks/bench_kv_transport.py [--model builtin] [--contexts 128,512,1024,1800] [--repeats 3]

Two Ray replicas of --threads-per-replica threads each. For every (context, repeat), each of the
six (transport, dtype) pairs moves one running greedy stream (after its 2nd token) to the other
replica, interleaved so that load drifts hit them alike. Per move, from its /admin/migrations
record: transfer_s (the copy rounds' wall time at the front end: export on the source, carrying,
receive on the target, including any wait for a step boundary), the bytes encoded, the blocks
moved, core_s (the two cores' own encode + decode time, a part of transfer_s), and downtime_s (the stream's stop-and-copy: migrate_out sent -> the target's commit answered).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from punctual.cluster.client import ClusterClient
from punctual.config import ClusterConfig, EngineConfig
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams

TRANSPORTS = ("relay", "object-store", "direct")


async def move_once(client: ClusterClient, request_id: str, prompt: list[int]) -> dict:
    """One stream, moved to the other replica after its 2nd token; its migration record."""
    delivered = 0
    second, done = asyncio.Event(), asyncio.Event()

    def on_update(update):
        nonlocal delivered
        for out in update.outputs:
            if out.request_id == request_id:
                delivered += len(out.new_token_ids)
                if delivered >= 2:
                    second.set()
                if out.finish_reason is not None:
                    done.set()

    client._on_update = on_update
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    client.add_request(EngineCoreRequest(request_id, list(prompt), params, arrival_time=0.0))
    await second.wait()
    source = client.requests[request_id].replica_id
    await client.migrate(request_id, 1 - source, "bench")
    await done.wait()
    return client.migrations[-1]


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["ok"]]
    if not ok:
        return {"ok": 0, "failed": len(records)}
    transfer = statistics.median(r["transfer_s"] for r in ok)
    mb = statistics.median(r["transfer_bytes"] for r in ok) / 1e6
    return {"ok": len(ok), "failed": len(records) - len(ok), "blocks": ok[-1]["precopy_blocks"] + ok[-1]["final_blocks"],
            "mb": mb, "transfer_s": transfer, "mb_per_s": mb / transfer if transfer else None,
            "downtime_s": statistics.median(r["downtime_s"] for r in ok),
            "core_s": statistics.median(r["core_s"] for r in ok),
            "estimate": ok[-1]["estimate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--contexts", default="128,512,1024,1800")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-replica", type=int, default=1)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--out", default="benchmarks/results/kv_transport.json")
    args = parser.parse_args()
    transports = args.transports.split(",")
    config = EngineConfig.from_kwargs(args.model, kv_cache_memory="512MiB")
    # object-store: the local Ray gets a store big enough for moved KV; each move then picks its transport.
    cluster = ClusterConfig(replicas=2, threads_per_replica=args.threads_per_replica, kv_transport="object-store")
    client = ClusterClient(config, cluster)
    records: dict[tuple[int, str, bool], list[dict]] = {}

    async def run() -> None:
        client.start()
        await client.attach(lambda update: None, lambda reason: None)
        n = 0
        try:
            for context in [int(c) for c in args.contexts.split(",")]:
                prompt = [(7 * i + context) % 3000 + 10 for i in range(context)]
                for _ in range(args.repeats):
                    for transport in transports:
                        for int8 in (False, True):
                            cluster.kv_transport, cluster.kv_transfer_int8 = transport, int8
                            n += 1
                            record = await move_once(client, f"m{n}", prompt)
                            records.setdefault((context, transport, int8), []).append(record)
        finally:
            await client.shutdown()

    asyncio.run(run())
    rows = [{"context": c, "transport": t, "int8": q, **summarize(rs)} for (c, t, q), rs in records.items()]
    print(f"{'context':>7} {'transport':>12} {'wire':>4} {'blocks':>6} {'MB':>6} {'copy ms':>8} {'MB/s':>6} "
          f"{'cores ms':>8} {'downtime ms':>11} {'ok':>3}")
    for row in rows:
        if not row.get("ok"):
            print(f"{row['context']:7d} {row['transport']:>12} {'int8' if row['int8'] else 'raw':>4}  every move failed")
            continue
        print(f"{row['context']:7d} {row['transport']:>12} {'int8' if row['int8'] else 'raw':>4} {row['blocks']:6d} "
              f"{row['mb']:6.2f} {row['transfer_s'] * 1e3:8.1f} {row['mb_per_s']:6.0f} {row['core_s'] * 1e3:8.1f} "
              f"{row['downtime_s'] * 1e3:11.1f} "
              f"{row['ok']:3d}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
