"""What moving a request's KV between two engines costs, against recomputing it on the target.

For each context length: the time to read a request's blocks out of the source pool, to pickle
them (what a socket or Ray's object store carries), to unpickle and write them into the target
pool, in the cache's dtype and int8-compressed; and a migration's downtime (the migrated
stream's stall: from the source letting go to the target's next token) with the KV moved,
against dropping it and recomputing prompt + generated tokens on the target.

    python benchmarks/bench_kv_transfer.py [--model builtin] [--contexts 256,1024,1792] [--runs 5]
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time


def make_engine(model: str, dtype: str, blocks: int):
    from punctual.config import EngineConfig
    from punctual.engine.core import EngineCore

    return EngineCore(EngineConfig.from_kwargs(model, dtype=dtype, num_kv_blocks=blocks, block_size=16,
                                               max_num_batched_tokens=2048, enable_prefix_caching=False))


def prefilled(core, request_id: str, context: int):
    """A request on `core` that has prefilled `context` tokens and generated one."""
    from punctual import SamplingParams
    from punctual.request import EngineCoreRequest

    prompt = [(i * 7919) % (core.vocab_size - 100) + 100 for i in range(context)]
    core.add_request(EngineCoreRequest(request_id, prompt, SamplingParams(temperature=0, max_tokens=64,
                                                                          ignore_eos=True)))
    while core.scheduler.requests[request_id].num_output_tokens == 0:
        core.step()


def measure(model: str, dtype: str, context: int, int8: bool) -> dict[str, float]:
    from punctual.request import EngineCoreRequest

    blocks = 2 * (context // 16 + 8) + 8
    source, target = make_engine(model, dtype, blocks), make_engine(model, dtype, blocks)
    prefilled(source, "r", context)
    started = time.perf_counter()
    payload = source.export_kv("r", int8=int8)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    wire = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - started
    # Downtime of a migration whose full blocks were pre-copied: stop, copy the rest, first token.
    full = payload.num_blocks
    target.reserve_import("r", full)
    target.receive_kv("r", 0, pickle.loads(wire))
    target.step() if target.has_unfinished_requests() else None
    started = time.perf_counter()
    state, rest = source.migrate_out("r", first_block=full, int8=int8)
    rest = pickle.loads(pickle.dumps(rest, protocol=pickle.HIGHEST_PROTOCOL))
    assert target.commit_import(state, full, rest)
    while not target.step():
        pass
    downtime_s = time.perf_counter() - started
    # The same request recomputed on a fresh engine: its whole context is a prompt again.
    other = make_engine(model, dtype, blocks)
    started = time.perf_counter()
    other.add_request(EngineCoreRequest("r", state.core_request.prompt_token_ids + state.output_token_ids,
                                        state.core_request.sampling_params))
    while not any(out.new_token_ids for out in other.step()):
        pass
    recompute_s = time.perf_counter() - started
    # Write cost alone: a full payload written into fresh blocks of a third engine.
    sink = make_engine(model, dtype, blocks)
    sink.reserve_import("w", full)
    started = time.perf_counter()
    from punctual.runner.kv_transfer import write_blocks

    loaded = pickle.loads(wire)
    write_blocks(sink.runner.kv_caches, sink.kv_manager.block_table("w"), loaded)
    write_s = time.perf_counter() - started
    return {"bytes": len(wire), "read_s": read_s, "pickle_s": pickle_s, "write_s": write_s,
            "downtime_s": downtime_s, "recompute_s": recompute_s, "blocks": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", default="256,1024,1792")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.model} {args.dtype}; medians of {args.runs} runs; downtime = stop-and-copy of the last "
          "blocks + the target's first step; recompute = a fresh engine prefilling prompt + output")
    print(f"{'context':>7} {'wire':>5} {'MB':>7} {'read ms':>8} {'pickle ms':>9} {'write ms':>8} "
          f"{'MB/s':>7} {'ms/block':>8} {'downtime ms':>11} {'recompute ms':>12}")
    for context in [int(c) for c in args.contexts.split(",")]:
        for int8 in (False, True):
            runs = [measure(args.model, args.dtype, context, int8) for _ in range(args.runs)]
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            moved_s = med["read_s"] + med["pickle_s"] + med["write_s"]
            print(f"{context:7d} {'int8' if int8 else 'raw':>5} {med['bytes'] / 1e6:7.2f} {med['read_s'] * 1e3:8.2f} "
                  f"{med['pickle_s'] * 1e3:9.2f} {med['write_s'] * 1e3:8.2f} {med['bytes'] / 1e6 / moved_s:7.0f} "
                  f"{moved_s * 1e3 / med['blocks']:8.3f} {med['downtime_s'] * 1e3:11.1f} {med['recompute_s'] * 1e3:12.1f}")


if __name__ == "__main__":
    main()
