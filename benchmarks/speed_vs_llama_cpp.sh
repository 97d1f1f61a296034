#!/usr/bin/env bash
# Issue 14's figures in one run, on a quiet machine (~25 minutes on 2 cores): Punctual (fused
# kernels, eager, int8, int4) against llama.cpp (bf16, and Q8_0 / Q4_0 made by its own converter
# and quantizer from the same checkpoint), through the same API and load generator, 2 threads each.
# Needs `punctual bench build-llama-cpp` first. Results land in $OUT (default benchmarks/results/speed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/speed}
MODEL=${MODEL:-smollm2}
mkdir -p "$OUT"
common=(--model "$MODEL" --max-num-seqs 32 --workload chat --length-scale 0.5 --threads 2 --no-progress)

echo "== one stream: bf16 / int8 / int4 against llama.cpp bf16 / Q8_0 / Q4_0"
punctual bench compare "${common[@]}" --concurrency 1 --num-requests 8 \
    --systems punctual,punctual:eager,punctual:int8,punctual:int4,llama.cpp,llama.cpp:q8_0,llama.cpp:q4_0 \
    --output "$OUT/one_stream.json"

echo "== 32 concurrent streams"
punctual bench compare "${common[@]}" --concurrency 32 --num-requests 64 \
    --systems punctual,punctual:eager,llama.cpp --output "$OUT/32_streams.json"

echo "== prefill of a 512-token prompt"
python benchmarks/bench_prefill_peers.py --model "$MODEL" --systems punctual,punctual:eager,llama.cpp --prompts 8 \
    | tee "$OUT/prefill.txt"

echo "== engine level: eager / fused / int8 / int4 / batch-invariant"
python benchmarks/bench_speed.py --model "$MODEL" --rounds 3 | tee "$OUT/engine.txt"

echo "== offline throughput against the compute roofline (fused, then eager)"
python benchmarks/bench_offline.py --model "$MODEL" --runs 1 --num-requests 64 --skip-hf --output "$OUT/offline.json"
python benchmarks/bench_offline.py --model "$MODEL" --runs 1 --num-requests 64 --skip-hf --enforce-eager \
    --output "$OUT/offline_eager.json"

echo "== accuracy: perplexity and greedy agreement against eager bf16"
python benchmarks/bench_quant_accuracy.py --model "$MODEL" --variants none-eager,none,int8,int4 | tee "$OUT/accuracy.txt"
