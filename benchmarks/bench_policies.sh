#!/usr/bin/env bash
# Scheduling policies side by side, each on its own fresh Punctual server, same load:
#  1. fcfs vs slo vs sjf on bursty `chat` (gamma arrivals, burstiness 4): SLO attainment and
#     goodput vs rate at TTFT 1 s / TPOT 100 ms (server-wide SLO defaults carry them to the engine).
#  2. fcfs vs fair on `multi-tenant`: per-tenant latency and share.
#
#   benchmarks/bench_policies.sh [OUT_DIR] [extra load flags, e.g. --sweep-rates 1,2,4]
set -euo pipefail
out="${1:-bench-policies}"
shift || true
mkdir -p "$out"
slo="--ttft-slo-ms 1000 --tpot-slo-ms 100"
for policy in fcfs slo sjf; do
  punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
    --punctual-args="--scheduling-policy $policy $slo" \
    --workload chat --burstiness 4 --num-requests 48 --sweep-rates 1,2,3,4 $slo --seed 0 \
    --output "$out/chat-$policy.json" --log-dir "$out/logs-$policy" --no-progress "$@"
done
for policy in fcfs fair; do
  punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
    --punctual-args="--scheduling-policy $policy" \
    --workload multi-tenant --num-requests 64 --request-rate 3 $slo --seed 0 \
    --output "$out/tenants-$policy.json" --log-dir "$out/logs-tenants-$policy" --no-progress "$@"
done
