#!/usr/bin/env bash
# Every figure in BENCHMARKS.md, one after another on a quiet machine (about 90 minutes on 2 cores; 65 without step 1).
#
#   benchmarks/run_all.sh [OUT_DIR]
#   STEPS="2 5" benchmarks/run_all.sh OUT_DIR     # only some steps (1 or its quick form 1q, 2, 3, 4, 4b, 5, 6, 6b, 6c)
set -uo pipefail
out="${1:-bench-results}"
mkdir -p "$out"
slo="--ttft-slo-ms 1000 --tpot-slo-ms 100"
steps=" ${STEPS:-1 2 3 4 4b 5 6 6b 6c} "
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/progress.log"; }
want() { [[ "$steps" == *" $1 "* ]]; }

if want 1; then
  log "1/6 offline engine vs transformers"
  python benchmarks/bench_offline.py --model builtin --dtype bfloat16 --num-requests 256 --runs 3 \
    --throughput-runs 1 --output "$out/offline.json" > "$out/offline.txt" 2>&1
fi

if want 1q; then
  log "1q/6 offline, quick: single-stream decode vs transformers, and Punctual's throughput alone"
  python benchmarks/bench_offline.py --model builtin --dtype bfloat16 --runs 3 --skip-throughput \
    --output "$out/offline-single.json" > "$out/offline-single.txt" 2>&1
  python benchmarks/bench_offline.py --model builtin --dtype bfloat16 --num-requests 256 --runs 1 --skip-hf \
    --output "$out/offline-throughput.json" > "$out/offline-throughput.txt" 2>&1
fi

if want 2; then
  log "2/6 peers side by side: chat (lengths x0.5) and shared-prefix (1,024-token documents)"
  punctual bench build-llama-cpp -j 2 > /dev/null 2>&1 || log "llama.cpp build failed: compare will skip it"
  punctual bench compare --model builtin --systems punctual,llama.cpp,hf-static --max-num-seqs 32 \
    --workload chat --length-scale 0.5 --num-requests 32 --sweep-rates 0.5,1,2,4,8 $slo --seed 0 \
    --output "$out/compare-chat.json" --log-dir "$out/logs-chat" --no-progress > "$out/compare-chat.txt" 2>&1
  punctual bench compare --model builtin --systems punctual,llama.cpp,hf-static --max-num-seqs 32 \
    --workload shared-prefix --num-requests 32 --sweep-rates 0.25,0.5,1,2,4 $slo --seed 0 \
    --output "$out/compare-shared-prefix.json" --log-dir "$out/logs-sp" --no-progress > "$out/compare-shared-prefix.txt" 2>&1
fi

if want 3; then
  log "3/6 front-end overhead"
  python benchmarks/bench_frontend_overhead.py --model builtin --concurrency 1,64 --requests 64 \
    > "$out/frontend.txt" 2>&1
fi

if want 4; then
  log "4/6 prefix cache off (the 'on' runs are in step 2), multi-turn on vs off, and multi-turn vs llama.cpp"
  punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
    --punctual-args="--no-enable-prefix-caching" \
    --workload shared-prefix --num-requests 32 --sweep-rates 0.25,0.5,1,2 $slo --seed 0 \
    --output "$out/shared-prefix-cache-off.json" --log-dir "$out/logs-sp-off" --no-progress \
    > "$out/shared-prefix-cache-off.txt" 2>&1
  for flag in enable no-enable; do
    punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
      --punctual-args="--$flag-prefix-caching" \
      --workload multi-turn --length-scale 0.5 --num-requests 32 --sweep-rates 0.5,1,2 $slo --seed 0 \
      --output "$out/multi-turn-$flag.json" --log-dir "$out/logs-mt-$flag" --no-progress \
      > "$out/multi-turn-$flag.txt" 2>&1
  done
  punctual bench compare --model builtin --systems punctual,llama.cpp --max-num-seqs 32 \
    --workload multi-turn --length-scale 0.5 --num-requests 32 --sweep-rates 1,2,4 $slo --seed 0 \
    --output "$out/compare-multi-turn.json" --log-dir "$out/logs-mt-compare" --no-progress \
    > "$out/compare-multi-turn.txt" 2>&1
fi

if want 4b; then
  log "4b/6 second KV tier: a pool too small for the documents, without and with the tier"
  for tier in 0 1GiB; do
    punctual bench compare --model builtin --systems punctual --max-num-seqs 4 \
      --punctual-args="--kv-cache-memory 72MiB --kv-tier-memory $tier" \
      --workload shared-prefix --num-requests 24 --request-rate 0.5 $slo --seed 0 \
      --output "$out/tier-$tier.json" --log-dir "$out/logs-tier-$tier" --no-progress > "$out/tier-$tier.txt" 2>&1
  done
  python benchmarks/bench_kv_int8.py --model builtin --dtype bfloat16 > "$out/kv-int8.txt" 2>&1
fi

if want 5; then
  log "5/6 scheduling policies"
  for policy in fcfs slo sjf; do
    punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
      --punctual-args="--scheduling-policy $policy $slo" \
      --workload chat --length-scale 0.5 --burstiness 4 --num-requests 48 --sweep-rates 2,3,4,6,8,12,16 $slo --seed 0 \
      --output "$out/policy-chat-$policy.json" --log-dir "$out/logs-policy-$policy" --no-progress \
      > "$out/policy-chat-$policy.txt" 2>&1
  done
  for policy in fcfs fair; do
    punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
      --punctual-args="--scheduling-policy $policy" \
      --workload multi-tenant --length-scale 0.5 --num-requests 48 --request-rate 3 $slo --seed 0 \
      --output "$out/policy-tenants-$policy.json" --log-dir "$out/logs-tenants-$policy" --no-progress \
      > "$out/policy-tenants-$policy.txt" 2>&1
    # The same mix under contention: the queue builds, and fairness decides who waits.
    punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
      --punctual-args="--scheduling-policy $policy" \
      --workload multi-tenant --length-scale 0.5 --num-requests 96 --request-rate 16 $slo --seed 0 \
      --output "$out/policy-tenants-contended-$policy.json" --log-dir "$out/logs-tenants-contended-$policy" \
      --no-progress > "$out/policy-tenants-contended-$policy.txt" 2>&1
  done
fi

if want 6; then
  log "6/6 speculative decoding"
  python benchmarks/bench_spec.py --model builtin --concurrency 1,8,32 --runs 5 --output "$out/spec.json" \
    > "$out/spec.txt" 2>&1
fi

if want 6b; then
  log "6b/6 speculative decoding under load: goodput off / fixed / adaptive on code, greedy and sampled"
  for sampling in greedy sampled; do
    case $sampling in
      greedy) samp="" ;;
      sampled) samp="--temperature 1 --top-k 3" ;;
    esac
    for mode in off fixed adaptive; do
      case $mode in
        off) spec="" ;;
        fixed) spec="--speculative-method ngram --num-speculative-tokens 4" ;;
        adaptive) spec="--speculative-method ngram --num-speculative-tokens 4 --speculative-length adaptive" ;;
      esac
      punctual bench compare --model builtin --systems punctual --max-num-seqs 32 \
        --punctual-args="$spec" $samp \
        --workload code --length-scale 0.25 --num-requests 48 --sweep-rates 1,2,4,8,12 $slo --seed 0 \
        --output "$out/spec-code-$sampling-$mode.json" --log-dir "$out/logs-spec-code-$sampling-$mode" \
        --no-progress > "$out/spec-code-$sampling-$mode.txt" 2>&1
    done
  done
fi
if want 6c; then
  log "6c/6 speculation off vs adaptive on sampled code, three interleaved repetitions (other seeds)"
  for rep in 1 2 3; do
    for mode in off adaptive; do
      spec=""
      [ $mode = adaptive ] && spec="--speculative-method ngram --num-speculative-tokens 4 --speculative-length adaptive"
      punctual bench compare --model builtin --systems punctual --max-num-seqs 32 --punctual-args="$spec" \
        --temperature 1 --top-k 3 --workload code --length-scale 0.25 --num-requests 48 --sweep-rates 2,4,8,12 \
        $slo --seed $rep --output "$out/spec-sampled-$mode-$rep.json" --log-dir "$out/logs-spec-sampled-$mode-$rep" \
        --no-progress > "$out/spec-sampled-$mode-$rep.txt" 2>&1
    done
  done
fi
log "done"
