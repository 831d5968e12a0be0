#!/usr/bin/env bash
# On a CUDA machine: the kernel tests on the GPU (TRITON_INTERPRET unset), then the kernel benchmark, then a
# short table last. Installs nothing. Usage: bench/gpu_check.sh [OUT_DIR]   (default bench/out)
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
"$PY" bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH=${PIPESTATUS[0]}
set -e

echo
echo "== summary =="
echo "pytest tests/kernels: $([ "$TESTS" = 0 ] && echo passed || echo "FAILED (rc $TESTS)")"
if [ "$BENCH" = 0 ]; then
    "$PY" bench/kernels.py --print-summary "$OUT/kernels.json"
else
    echo "bench/kernels.py: FAILED (rc $BENCH)"
fi
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ]
