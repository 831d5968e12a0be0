#!/usr/bin/env bash
# On a CUDA machine (no tritonserver needed): the kernel tests on the GPU (TRITON_INTERPRET unset), the engine's
# parity with transformers on CUDA (fp32, Triton kernels), the kernel benchmark and the engine benchmark, then
# a short table last. Installs nothing. Usage: bench/gpu_check.sh [OUT_DIR]   (default bench/out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/out}"
PY="${PYTHON:-python}"  # the image's python (with CUDA torch); PYTHON=... to pick another
unset TRITON_INTERPRET
export PYTHONPATH="$PWD/backend${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PY" - <<'PYEOF'
import torch, triton
print(f"torch {torch.__version__}  triton {triton.__version__}  cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name())
PYEOF

set +e
"$PY" -m pytest tests/kernels -x -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_kernels.log"
TESTS=${PIPESTATUS[0]}
PAGEDLLM_TEST_DEVICE=cuda "$PY" -m pytest tests/test_engine.py tests/test_prefix_cache.py tests/test_scheduler.py \
    -x -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_engine.log"
ENGINE_TESTS=${PIPESTATUS[0]}
"$PY" bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH=${PIPESTATUS[0]}
# A ~0.5B-parameter random Llama (hidden 2048, head dim 128, GQA 16/4): big enough for the GPU to matter.
"$PY" bench/engine.py --device cuda --batch 1 8 32 --prompt-len 256 --max-tokens 128 --out "$OUT" \
    --size 2048 8 16 4 5632 2>&1 | tee "$OUT/engine.log"
ENGINE_BENCH=${PIPESTATUS[0]}
set -e

echo
echo "== summary =="
echo "pytest tests/kernels: $([ "$TESTS" = 0 ] && echo passed || echo "FAILED (rc $TESTS)")"
echo "engine parity on cuda: $([ "$ENGINE_TESTS" = 0 ] && echo passed || echo "FAILED (rc $ENGINE_TESTS)")"
[ "$ENGINE_BENCH" = 0 ] && grep -A4 "^ batch" "$OUT/engine.log" || echo "bench/engine.py: FAILED (rc $ENGINE_BENCH)"
if [ "$BENCH" = 0 ]; then
    "$PY" bench/kernels.py --print-summary "$OUT/kernels.json"
else
    echo "bench/kernels.py: FAILED (rc $BENCH)"
fi
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ] && [ "$ENGINE_TESTS" = 0 ] && [ "$ENGINE_BENCH" = 0 ]
