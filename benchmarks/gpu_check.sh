#!/usr/bin/env bash
# The CUDA path, checked on a bare CUDA machine (PyTorch with CUDA installed, no network), in
# at most ~10 minutes: transformers parity with device=cuda, then single-stream and 32-stream
# decode speed, with CUDA graphs (the default on CUDA) and without (--enforce-eager). Not run yet:
# until its output is in BENCHMARKS.md, the CUDA path is unmeasured. --quantization is CPU-only.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; output also in gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG=gpu_check.log
exec > >(tee "$LOG") 2>&1

python - <<'PY' || exit 1
import importlib.util, sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to check")
print("device:", torch.cuda.get_device_name(0))
missing = [m for m in ("transformers", "safetensors", "tokenizers", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages (no network here): {', '.join(missing)}")
PY

status=0
echo "== 1. greedy parity with transformers on CUDA, decode steps replayed from CUDA graphs"
echo "   (device=auto picks cuda; transformers runs on CPU)"
timeout 240 python -m pytest -q -x tests/test_exact_to_transformers.py tests/test_attention.py \
    tests/test_decode_graphs.py || status=1

echo "== 2. decode tok/s at 1 and 32 streams, 512-token prefill, bf16 and fp32 on cuda, CUDA graphs against eager"
timeout 240 python benchmarks/bench_speed.py --model builtin --rounds 3 --steps 32 \
    --variants graphs=dtype:bfloat16,device:cuda eager=dtype:bfloat16,device:cuda,enforce_eager:true \
    fp32-graphs=dtype:float32,device:cuda fp32-eager=dtype:float32,device:cuda,enforce_eager:true || status=1

echo "== 3. decode step by batch size and context (bf16, cuda, CUDA graphs)"
timeout 90 python - <<'PY' || status=1
import runpy, sys
sys.argv = ["bench_decode_step.py", "--skip-kernel", "--steps", "20"]
runpy.run_path("benchmarks/bench_decode_step.py", run_name="__main__")
PY
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED) (log in $LOG)"
exit $status
