#!/bin/bash
# One quiet pass of this session's measurements; each output saved under R.
cd /work/main && . .venv/bin/activate
R=benchmarks/results/speed/2026-12-07b
mkdir -p $R
lscpu > $R/lscpu.txt
run() { name=$1; shift; echo "=== $name: $* ($(date +%T))"; /usr/bin/time -f "%e s" "$@" > $R/$name.log 2>&1; tail -3 $R/$name.log; }
case "$1" in
A)
run tune python benchmarks/tune_kernels.py --threads 2 --write
run speed python benchmarks/bench_speed.py --rounds 3
run speed_avx2 env PUNCTUAL_KERNELS_ISA=avx2 python benchmarks/bench_speed.py --rounds 2
run offline python benchmarks/bench_offline.py --model smollm2 --runs 1 --num-requests 64 --skip-hf --output $R/offline.json
;;
B)
run lora python benchmarks/bench_lora.py
run quest python benchmarks/bench_long_context.py
run streaming python benchmarks/bench_streaming.py
run tp_qwen3 python benchmarks/bench_tensor_parallel.py --model /work/archmodels/qwen3-0.6b --configs 1x2,2x1
run tp_smollm2 python benchmarks/bench_tensor_parallel.py
run window python benchmarks/bench_weight_window.py
run sim_scale python benchmarks/bench_sim_scale.py
;;
esac
