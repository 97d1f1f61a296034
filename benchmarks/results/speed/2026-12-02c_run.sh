set -x
cd /work/main
export PATH=/work/main/.venv/bin:$PATH
O=/tmp/quiet/r5
common=(--model smollm2 --max-num-seqs 32 --workload chat --length-scale 0.5 --threads 2 --no-progress)
for r in 1 2; do
  punctual bench compare "${common[@]}" --concurrency 32 --num-requests 64 --systems punctual,llama.cpp --output $O/32_streams_run$r.json > $O/32_streams_run$r.log 2>&1
done
for r in 1 2; do
  for v in base main; do
    if [ $v = base ]; then pp=/work/wt/base; else pp=/work/main; fi
    PYTHONPATH=$pp python benchmarks/bench_offline.py --model smollm2 --runs 1 --num-requests 64 --skip-hf --output $O/offline_${v}_run$r.json > $O/offline_${v}_run$r.log 2>&1
  done
done
for r in 1 2 3; do
  punctual bench compare "${common[@]}" --concurrency 1 --num-requests 8 --systems punctual,punctual:int8,punctual:int4,llama.cpp,llama.cpp:q8_0,llama.cpp:q4_0 --output $O/one_stream_run$r.json > $O/one_stream_run$r.log 2>&1
done
echo done > $O/DONE
