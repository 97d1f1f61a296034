"""`punctual sim calibrate --server`: fit the serving path's share onto an offline profile.

The offline calibration times the engine's steps in-process, alone on the machine. A server
adds two things a client sees: the front end (HTTP, tokenizing, the socket to the core on the
way in; detokenizing and SSE on the way out), and a slower step loop (the core shares the
cores with the front-end process, and its loop also sends outputs and takes in commands). Both
are measured from the server's own record (`punctual.engine.trace`, written by its core process):

- admit_s: median of (core received the request - the front end's HTTP arrival stamp) over the
  requests that found the core between steps: one that arrives mid-step also waits for that
  step to end, and the simulator charges that wait itself (a quiet builtin trace: 1.25 ms
  between steps, 2.6 ms over all requests);
- deliver_s + deliver_per_stream_s x streams: (the client's TTFT - (the step with the first
  token sent - arrival stamp)) against the streams sampled in that step, fitted by least squares
  over the requests sent one at a time and those of the loaded phases (the front end detokenizes
  and sends every stream's token of a step: a quiet smollm2 trace, 3.5 ms + 0.4 ms per stream);
- the step loop: the serving loop's period per step over every traced step (under load, so
  contention is in the fit), fitted as the offline prediction x scale + a fixed overhead + a
  cost per sampled row + a cost per step that carries prompt tokens (`trace.fit_serving_overhead`,
  each step weighted by the streams it serves, as TPOT weighs it); the profile's coefficients are
  multiplied by the scale, the overhead added to the fixed cost, the row cost to sampled rows,
  the prefill-step cost kept as "prefill_steps". Its error is reported by kind (decode-only,
  with prompt tokens) and streams per step ("by_kind", "by_batch").
- the load that makes those steps: requests one at a time, open-loop `rates`, and (`saturate`)
  a closed loop of max_num_seqs clients per replica. Open-loop rates make big batches only on
  a machine slow enough for them; without the closed loop the per-stream cost was fitted from
  one- to three-stream steps (every quiet AMD profile: 0-0.3 ms per row) and the simulator's
  TPOT fell further behind the more streams a request shared its steps with.
- the speed probe (`punctual.sim.probe`): a fixed request's seconds per token after the
  one-at-a-time phase and after each rate, their mean kept as the profile's `speed_probe`, the
  machine's speed while the steps above were traced (`sim validate --rescale-per-point`
  compares with it).
- the spread (`punctual.sim.spread`): quantiles of every traced step's time over the fitted
  price (the steps left out of the fit as interference too: a server has them), and of the
  front end's admit delay, so the simulator's tails are as long as the server's.

With `replicas` > 1 the server is a cluster (`serve --replicas N` on Ray), each replica's core
tracing to a file of its own: the fit then runs over every replica's steps, so it prices what a
lone engine's profile cannot see (N cores sharing memory bandwidth, the cluster client, Ray), and
admit/deliver include the hop through the cluster client. Calibrate the offline part with
`--threads` equal to the replicas' threads, and validate with the same --replicas and --router.

Its requests use salts of their own, so `sim validate` with the same seed measures other text.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

from punctual.engine.trace import TRACE_ENV
from punctual.sim.move_cost import learned_kv_transfer, migrations
from punctual.sim.probe import calibration_probe, run_probe
from punctual.sim.profile import PREFILL_STEPS, StepProfile
from punctual.sim.spread import quantile_table, with_mean
from punctual.sim.trace import (ServerTrace, delivery_line, first_token_path, fit_serving_overhead,
                                match_records, median, read_traces, step_weights)

CALIBRATION_SALT = 1000  # above any salt a bench run uses
BATCH_BUCKETS = (("1", 0, 1), ("2-4", 2, 4), ("5-16", 5, 16), ("17+", 17, 1 << 30))  # streams sampled in a step
# The row factors' buckets (streams sampled in a step): powers of two, the sizes at which a
# kernel dispatch table changes kernel; a bucket needs this many decode-only steps of its own.
ROW_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 1 << 30))
ROW_BUCKET_TOP = 1 << 20  # the last bucket's high end as written (JSON keeps it readable)
ROW_BUCKET_MIN_STEPS = 20


def calibrate_server(base: StepProfile, model: str, serve_args: list[str], *, workload: str = "chat",
                     rates: tuple[float, ...] = (1.0, 2.0), num_requests: int = 30, sequential: int = 12,
                     seed: int = 0, length_scale: float = 0.25, max_num_seqs: int = 32,
                     startup_timeout: float = 600.0, threads: int | None = None, replicas: int = 1,
                     threads_per_replica: int = 1, router: str = "cache_aware", prefill_replicas: int = 0,
                     decode_replicas: int = 0, saturate: bool = True,
                     log: Callable[[str], None] = print) -> StepProfile:
    from punctual.bench import loadgen
    from punctual.bench.arrivals import arrival_offsets
    from punctual.bench.peers import PeerOptions, free_port, punctual_peer, running
    from punctual.bench.workloads import generate_workload
    from punctual.sim.validate import cluster_serve_args

    workdir = Path(tempfile.mkdtemp(prefix="punctual-calibrate-server-"))
    trace_path = workdir / "steps.jsonl"
    cluster_args = cluster_serve_args(replicas, threads_per_replica, router, prefill_replicas, decode_replicas)
    options = PeerOptions(max_num_seqs=max_num_seqs, punctual_args=tuple(serve_args) + cluster_args)
    if threads is not None and replicas == 1 and not prefill_replicas:  # the server runs with the threads the offline profile had
        options = dataclasses.replace(options, threads=threads)
    spec = punctual_peer(model, free_port(), options)
    spec = dataclasses.replace(spec, env={**spec.env, TRACE_ENV: str(trace_path)})
    log(f"calibrate --server: starting {' '.join(spec.command)}")
    started = time.perf_counter()
    with running(spec, workdir / "server.log", startup_timeout) as endpoint:
        endpoint = dataclasses.replace(endpoint, extra_body={"temperature": 0.0, **endpoint.extra_body})
        salt = iter(range(CALIBRATION_SALT, CALIBRATION_SALT + 100))
        warm = generate_workload(workload, 2, seed, length_scale, next(salt))
        loadgen.run(endpoint, warm, concurrency=1, progress=False)
        one_at_a_time = generate_workload(workload, sequential, seed, length_scale, next(salt))
        alone = loadgen.run(endpoint, one_at_a_time, concurrency=1, progress=False)
        probes = [run_probe(endpoint)]  # after the requests whose trace entries are read by place
        loaded = []
        for rate in rates:  # loaded steps: batches as the validation's rates make them
            requests = generate_workload(workload, num_requests, seed, length_scale, next(salt))
            loaded.append(loadgen.run(endpoint, requests, offsets=arrival_offsets(len(requests), rate, 1.0, seed),
                                      progress=False))
            probes.append(run_probe(endpoint))
        # Prefill/decode: what its moves cost, under the open-loop load a validation runs. The
        # closed loop's moves queue behind one another at the prefill replica (222 ms a copy round
        # against 50 ms at 0.5-2 req/s), so they are not the price of a move.
        moves = migrations(endpoint.base_url) if prefill_replicas else []
        saturated_clients = max_num_seqs * max(replicas, decode_replicas) if saturate else 0
        if saturated_clients:  # batches up to the engine's largest, whatever this machine's speed
            requests = generate_workload(workload, 2 * saturated_clients, seed, length_scale, next(salt))
            loaded.append(loadgen.run(endpoint, requests, concurrency=saturated_clients, progress=False))
            probes.append(run_probe(endpoint))
        time.sleep(0.5)  # the core writes its trace when it goes idle
    trace = read_traces(str(trace_path))  # a cluster's replicas: one file each
    log(f"calibrate --server: {len(trace.rows)} steps, {len(trace.adds)} requests traced in "
        f"{time.perf_counter() - started:.0f} s")
    if len(trace.adds) < len(warm) + sequential:
        raise RuntimeError(f"calibrate --server: the core traced {len(trace.adds)} requests, expected at least "
                           f"{len(warm) + sequential} (trace {trace_path})")

    deliveries = delivery_samples(trace, alone.records, loaded, len(warm), closed_loop=bool(saturated_clients))
    meta = {"workload": workload, "rates": list(rates), "length_scale": length_scale,
            "saturated_clients": saturated_clients}
    if replicas > 1 or prefill_replicas:
        meta.update(replicas=replicas, threads_per_replica=threads_per_replica, router=router,
                    prefill_replicas=prefill_replicas, decode_replicas=decode_replicas)
    profile = fit_serving_profile(base, trace, deliveries, meta)
    log("calibrate --server: fitted / traced step time, weighted by streams, by kind and streams per step "
        "(steps): " + describe_residuals(profile.fit["server"]))
    speed_probe = calibration_probe(probes)
    log(f"calibrate --server: speed probe {speed_probe['token_s'] * 1000:.2f} ms per token (rounds "
        + ", ".join(f"{t * 1000:.2f}" for t in speed_probe["rounds_token_s"]) + ")")
    profile = dataclasses.replace(profile, engine={**base.engine, "serve_args": list(serve_args)},
                                  speed_probe=speed_probe)
    if prefill_replicas:
        block_size = base.engine.get("block_size") or 16
        learned = learned_kv_transfer(moves, base.model.get("kv_bytes_per_token", 0) * block_size,
                                      offline=base.kv_transfer)
        if learned is None:
            log(f"calibrate --server: {len(moves)} KV moves, too few to learn their cost; the profile keeps "
                "the offline kv_transfer")
        else:
            log(f"calibrate --server: KV moves cost {learned['fixed_s'] * 1000:.2f} ms + "
                f"{learned['per_block_s'] * 1000:.3f} ms per block per copy round, over {learned['num_moves']} moves "
                f"({learned['fit']}; the profile's kv_transfer now)")
            profile = dataclasses.replace(profile, kv_transfer=learned)
    return profile


def delivery_samples(trace: ServerTrace, alone: list, loaded: list, num_warm: int,
                     closed_loop: bool) -> list[tuple[float, float]]:
    """(streams in the first token's step, delivery delay) of the traced requests: the
    one-at-a-time ones (`alone`, after `num_warm` warm-ups) by place, the loaded phases' (each a
    LoadResult, the closed loop last when `closed_loop`) matched by their lengths, probes in
    between skipped. Not the closed loop's: its max_num_seqs x replicas clients share the cores
    with the server, and a first token waits for the load generator to read it (a 2-replica
    smollm2 cluster's 256 clients fitted 52 ms of delivery where the open-loop requests took
    3-10 ms, and the simulator's TTFT came out 40-70% late). Its steps are still fitted."""
    matched = list(zip(alone, trace.adds[num_warm:num_warm + len(alone)]))
    cursor = num_warm + len(alone)
    for phase, result in enumerate(loaded):
        adds, cursor = match_records(trace.adds, [r.to_json() for r in result.records], cursor)
        if not (closed_loop and phase == len(loaded) - 1):
            matched += [(record, add) for record, add in zip(result.records, adds) if add is not None]
    deliveries = []
    for record, add in matched:
        path = first_token_path(trace, add, record.ttft_s) if record.ok else None
        if path is not None and path["deliver_s"] is not None:
            deliveries.append((path["streams"], path["deliver_s"]))
    return deliveries


def fit_delivery(deliveries: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, per stream) seconds of deliver = fixed + per_stream x streams over (streams, delay)
    pairs (`trace.delivery_line`); where the data cannot show a positive slope (one stream count,
    or a negative fit), no slope and the median as the fixed part."""
    if not deliveries:
        return 0.0, 0.0
    line = delivery_line(deliveries)
    if line is not None and line[1] > 0 and line[0] >= 0:
        return line
    return max(0.0, median([d for _, d in deliveries])), 0.0


def residuals_by_batch(rows, seconds, priced) -> dict:
    """The fit's own error per bucket of streams sampled in a step: steps, measured / fitted time
    ("time_ratio"), and the same weighted by each step's streams ("tpot_ratio": what a mean TPOT
    over those steps would be off by). 1.0 is a fit right there."""
    weights = step_weights(rows)
    out = {}
    for label, low, high in BATCH_BUCKETS:
        inside = [i for i, x in enumerate(rows) if low <= x[5] <= high and priced[i] > 0]
        if inside:
            out[label] = {"num_steps": len(inside),
                          "time_ratio": sum(seconds[i] for i in inside) / sum(priced[i] for i in inside),
                          "tpot_ratio": (sum(weights[i] * seconds[i] for i in inside)
                                         / sum(weights[i] * priced[i] for i in inside))}
    return out


def describe_residuals(server_fit: dict) -> str:
    """One line of the fit's error by kind and streams, for the log."""
    parts = []
    for kind, buckets in server_fit.get("by_kind", {}).items():
        parts.append(f"{kind}: " + ", ".join(f"{label} x{b['tpot_ratio']:.3f} ({b['num_steps']})"
                                             for label, b in buckets.items()))
    return "; ".join(parts) or "-"


def fit_serving_profile(base: StepProfile, trace: ServerTrace, deliveries: list[tuple[float, float]],
                        meta: dict) -> StepProfile:
    """`base` with the serving path fitted onto it from a server's trace and the delivery delays
    of traced requests as (streams in the first token's step, the client's TTFT - the core's
    first-token send - arrival)."""
    serving, kept = fit_serving_overhead(base.predict, trace.rows, trace.seconds)
    coefficients = {name: value * serving["scale"] for name, value in base.coefficients.items()}
    coefficients["fixed"] = coefficients.get("fixed", 0.0) + serving["overhead_s"]
    coefficients["sampled_rows"] = coefficients.get("sampled_rows", 0.0) + serving["per_row_s"]
    coefficients[PREFILL_STEPS] = coefficients.get(PREFILL_STEPS, 0.0) + serving["prefill_step_s"]
    row_factors = fit_row_factors(StepProfile("linear", coefficients), trace.rows, trace.seconds, kept)
    if row_factors is not None:
        coefficients[PREFILL_STEPS] = refit_prefill_step(StepProfile("linear", coefficients, row_factors=row_factors),
                                                         trace.rows, trace.seconds, kept)
    fitted = StepProfile("linear", coefficients, row_factors=row_factors)
    errors = sorted(abs(fitted.predict(trace.rows[i]) - trace.seconds[i]) / trace.seconds[i] for i in kept)
    admit = median(trace.front_end_delays)
    if admit is None:  # every request arrived mid-step (not with the one-at-a-time phase): an upper bound
        admit = median(trace.admit_delays)
    deliver, per_stream = fit_delivery(deliveries)
    frontend = {"admit_s": max(0.0, admit or 0.0), "deliver_s": deliver, "deliver_per_stream_s": per_stream,
                "num_requests": len(trace.adds), "num_between_steps": len(trace.front_end_delays),
                "num_deliveries": len(deliveries)}
    priced = [fitted.predict(x) for x in trace.rows]
    # The fit's own error by batch size (streams sampled in a step): measured / fitted time per
    # bucket. A fit that is right on average can still price the big batches of a busy server
    # low (TPOT predicted early at high rates) if the calibration's rates rarely made them.
    by_batch = residuals_by_batch(trace.rows, trace.seconds, priced)
    # And by kind: decode-only steps, and steps that also ran prompt tokens (a prompt chunk beside
    # the decodes costs more than its tokens: the front end admits that request meanwhile).
    by_kind = {}
    for kind, mixed in (("decode", False), ("mixed", True)):
        inside = [i for i, x in enumerate(trace.rows) if (x[1] > 0) == mixed]
        if inside:
            by_kind[kind] = residuals_by_batch([trace.rows[i] for i in inside], [trace.seconds[i] for i in inside],
                                               [priced[i] for i in inside])
    # The draws average what every traced step cost over its price, weighted as the fit (1 but for
    # the wild steps it left out): a draw is independent of the step's streams, so the simulator's
    # steps then cost what the server's did in the mean a TPOT takes.
    weights = step_weights(trace.rows)
    overall = (sum(w * s for w, s, p in zip(weights, trace.seconds, priced) if p > 0)
               / max(1e-12, sum(w * p for w, p in zip(weights, priced) if p > 0)))
    spread = {name: table for name, table in (
        ("step_ratio", with_mean(quantile_table([s / p for s, p in zip(trace.seconds, priced) if p > 0]), overall)),
        ("admit_s", quantile_table(trace.front_end_delays))) if table is not None}
    fit = {**base.fit, "offline_coefficients": base.coefficients,
           "server": {"num_steps": len(trace.rows), "num_outliers": len(trace.rows) - len(kept), **serving,
                      # the term as priced (refitted after the row factors), not the line's first fit
                      "prefill_step_s": (coefficients.get(PREFILL_STEPS, 0.0)
                                         - base.coefficients.get(PREFILL_STEPS, 0.0)),
                      "mean_step_s": sum(trace.seconds[i] for i in kept) / len(kept),  # the steps fitted
                      "mean_predicted_s": sum(fitted.predict(trace.rows[i]) for i in kept) / len(kept),
                      "median_abs_rel_error": errors[len(errors) // 2] if errors else None,
                      "p90_abs_rel_error": errors[int(len(errors) * 0.9)] if errors else None,
                      "by_batch": by_batch, "by_kind": by_kind, "row_factors": row_factors, **meta}}
    return dataclasses.replace(base, coefficients=coefficients, frontend=frontend, fit=fit, spread=spread or None,
                               row_factors=row_factors)


def fit_row_factors(linear: StepProfile, rows: list[tuple[float, ...]], seconds: list[float], kept: list[int],
                    min_steps: int = ROW_BUCKET_MIN_STEPS) -> list[list] | None:
    """Each ROW_BUCKETS bucket's factor on the linear price: its decode-only steps' measured time
    over their price, weighted by streams as the fit is (what a mean TPOT over those steps is off
    by). A bucket with fewer than `min_steps` such steps keeps the line's price (factor 1: the
    least-squares fit over every step is the best guess there); None when no bucket has enough.
    The prefill-step term is not in the price: decode-only steps have none."""
    weights = step_weights(rows)
    fitted: list[float | None] = []
    for low, high in ROW_BUCKETS:
        inside = [i for i in kept if rows[i][1] == 0 and low <= rows[i][5] <= high]
        priced = sum(weights[i] * linear.predict(rows[i]) for i in inside)
        fitted.append(sum(weights[i] * seconds[i] for i in inside) / priced
                      if len(inside) >= min_steps and priced > 0 else None)
    if all(f is None for f in fitted):
        return None
    factors = [1.0 if f is None else f for f in fitted]
    return [[low, min(high, ROW_BUCKET_TOP), round(factor, 6)] for (low, high), factor in zip(ROW_BUCKETS, factors)]


def refit_prefill_step(profile: StepProfile, rows: list[tuple[float, ...]], seconds: list[float],
                       kept: list[int]) -> float:
    """The prefill-step term again once the row factors price the rest: the median of what steps
    with prompt tokens cost beyond their price without the term (none negative). The median, not
    a mean: a prefill replica of a prefill/decode pair answers its moves' export commands right
    after the step that made their first tokens, and a step that finished 20-40 prompts waited
    200-300 ms for them; a streams-weighted mean priced every prompt step 151 ms over (the
    simulator's TTFT came out 140-200% late) where the median step took 38 ms more. On one
    engine the two agree within a few ms."""
    inside = [i for i in kept if rows[i][1] > 0]
    if not inside:
        return 0.0
    term = profile.coefficients.get(PREFILL_STEPS, 0.0)
    return max(0.0, median([seconds[i] - (profile.predict(rows[i]) - term) for i in inside]))

