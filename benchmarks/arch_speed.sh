#!/usr/bin/env bash
# The new architectures against llama.cpp, through the same API and load generator, 2 threads each,
# on a quiet machine: random-weight checkpoints of Qwen3-0.6B's, Gemma-3-1B's and a 16-expert MoE's
# shapes (benchmarks/arch_models.py), converted for llama.cpp by its own converter. One stream and
# 32 streams, bf16 on both sides. Needs `punctual bench build-llama-cpp` first.
#   bash benchmarks/arch_speed.sh [MODELS_DIR] [qwen3-0.6b gemma3-1b qwen3moe-16x]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${PUNCTUAL_CACHE:-$HOME/.cache/punctual}/arch-models}
shift || true
MODELS=${*:-qwen3-0.6b gemma3-1b qwen3moe-16x}
OUT=${OUT:-benchmarks/results/speed}
STAMP=${STAMP:-$(date +%F)}
mkdir -p "$OUT"
python benchmarks/arch_models.py "$DIR" --only "$(echo $MODELS | tr ' ' ',')"
lscpu | grep -E "Model name|Flags" > "$OUT/${STAMP}_arch_lscpu.txt"
for model in $MODELS; do
  common=(--model "$DIR/$model" --max-num-seqs 32 --workload chat --length-scale 0.5 --threads 2 --no-progress
          --kv-cache-memory 2GiB --slot-context 1024)
  echo "== $model: one stream"
  punctual bench compare "${common[@]}" --concurrency 1 --num-requests 8 --systems punctual,llama.cpp \
      --output "$OUT/${STAMP}_arch_${model}_one_stream.json" 2>&1 | tail -5
  echo "== $model: 32 streams"
  punctual bench compare "${common[@]}" --concurrency 32 --num-requests 64 --systems punctual,llama.cpp \
      --output "$OUT/${STAMP}_arch_${model}_32_streams.json" 2>&1 | tail -5
done
