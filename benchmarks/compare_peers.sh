#!/usr/bin/env bash
# Punctual vs llama.cpp's llama-server vs a static-batching transformers server, on the
# SmolLM-135M-shaped `builtin` checkpoint (bf16): goodput at TTFT 1 s / TPOT 100 ms for the
# chat and shared-prefix workloads. Run it on a quiet machine; every system gets all cores.
#
#   benchmarks/compare_peers.sh [OUT_DIR] [extra `punctual bench compare` flags]
#
# Writes OUT_DIR/results.json, OUT_DIR/results-chat.png, OUT_DIR/results-shared-prefix.png and
# the server logs under OUT_DIR/logs; about 45 minutes (up to an hour) on 2 cores. Extra flags
# win over these: pass --sweep-rates ... if a system's goodput reads "< 0.5" or ">= 3". The
# first run builds llama-server (10-15 min on 2 cores, cached in ~/.cache/punctual/llama.cpp).
set -euo pipefail
out="${1:-bench-results}"
shift || true
mkdir -p "$out"
punctual bench build-llama-cpp -j "$(nproc)" >/dev/null || echo "llama.cpp build failed: the comparison will skip it" >&2
punctual bench compare --model builtin --systems punctual,llama.cpp,hf-static --max-num-seqs 32 \
  --workload chat,shared-prefix --num-requests 64 --sweep-rates 0.5,1,1.5,2,3 \
  --ttft-slo-ms 1000 --tpot-slo-ms 100 --seed 0 \
  --output "$out/results.json" --log-dir "$out/logs" "$@"
