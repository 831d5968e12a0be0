#!/usr/bin/env bash
# On a CUDA machine (no tritonserver needed), in two phases:
#   A. correctness, in parallel (timings don't matter yet): the kernel tests compiled for this GPU
#      (TRITON_INTERPRET unset) beside the engine's greedy parity with transformers on CUDA (fp32, Triton kernels,
#      CUDA graphs on: the default);
#   B. timings, one at a time on a quiet GPU: bench/decode.py (ms per decode step and tok/s at batch 1, 8, 32, 64
#      for the Llama-3-8B shape and a ~0.5B one, CUDA graphs on and off, as a fraction of copy bandwidth),
#      bench/profile_step.py (a torch.profiler table of the 8B decode step at batch 8 and 32: the batch-32
#      cliff), bench/kernels.py --tune (each kernel against its torch baseline, then a sweep of attention launch
#      configs), bench/engine.py (the engine against transformers generate).
# A short table comes last. Installs nothing; each stage has a time limit, so one that hangs cannot eat the
# others' time. Usage: bench/gpu_check.sh [OUT_DIR]   (default bench/out). Writes OUT/check.log (everything),
# decode.json/.png, profile.txt, kernels.json/.png, engine.json/.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/out}"
PY="${PYTHON:-python3}"  # the image's python (with CUDA torch); PYTHON=... to pick another
unset TRITON_INTERPRET
export PYTHONPATH="$PWD/backend${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/check.log"
: >"$LOG"
T0=$SECONDS

"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import torch, triton, transformers
print(f"torch {torch.__version__}  triton {triton.__version__}  transformers {transformers.__version__}  "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"

# ---- A: correctness (parallel) ---------------------------------------------------------------------------------
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# test_compile.py is left out: it compiles for sm_80/sm_90 without a GPU, which CI does on every run.
timeout 200 "$PY" -m pytest tests/kernels -q -p no:cacheprovider $XDIST --deselect tests/kernels/test_compile.py \
    >"$OUT/kernels_tests.txt" 2>&1 &
PID_K=$!
PAGEDLLM_TEST_DEVICE=cuda timeout 200 "$PY" -m pytest tests/test_engine.py tests/test_prefix_cache.py \
    tests/test_scheduler.py -q -p no:cacheprovider >"$OUT/engine_tests.txt" 2>&1 &
PID_E=$!
wait $PID_K; TESTS=$?
wait $PID_E; ENGINE_TESTS=$?
for f in kernels_tests engine_tests; do
    echo "== pytest $f ==" >>"$LOG"; cat "$OUT/$f.txt" >>"$LOG"; rm -f "$OUT/$f.txt"
done
tail -n 25 "$LOG"
echo "phase A done at $((SECONDS - T0)) s" | tee -a "$LOG"

# ---- B: timings (one at a time) -------------------------------------------------------------------------------
timeout 300 "$PY" bench/decode.py --device cuda --out "$OUT" 2>&1 | tee -a "$LOG"
DECODE=${PIPESTATUS[0]}
echo "decode bench done at $((SECONDS - T0)) s" | tee -a "$LOG"
timeout 120 "$PY" bench/profile_step.py --batch 8 32 --out "$OUT" 2>&1 | tail -n 60 | tee -a "$LOG"
timeout 240 "$PY" bench/kernels.py --out "$OUT" --tune --tune-budget 40 --graph 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}
echo "kernel bench done at $((SECONDS - T0)) s" | tee -a "$LOG"
# A ~0.5B-parameter random Llama (hidden 2048, head dim 128, GQA 16/4): big enough for the GPU to matter.
# SKIP_ENGINE_BENCH=1 leaves it out (a rerun that changed only kernels).
if [ -z "${SKIP_ENGINE_BENCH:-}" ]; then
    timeout 130 "$PY" bench/engine.py --device cuda --batch 1 8 32 --prompt-len 256 --max-tokens 128 --out "$OUT" \
        --size 2048 8 16 4 5632 2>&1 | tee -a "$LOG"
    ENGINE_BENCH=${PIPESTATUS[0]}
else
    ENGINE_BENCH=skipped
fi

{
    echo
    echo "== summary ($((SECONDS - T0)) s) =="
    echo "pytest tests/kernels on CUDA: $([ "$TESTS" = 0 ] && echo passed || echo "FAILED (rc $TESTS)") —" \
        "$(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$LOG" | head -1)"
    echo "engine parity on CUDA: $([ "$ENGINE_TESTS" = 0 ] && echo passed || echo "FAILED (rc $ENGINE_TESTS)") —" \
        "$(grep -E '(passed|failed|error).* in [0-9.]+s' "$LOG" | sed -n 2p)"
    if [ "$DECODE" = 0 ]; then grep -E "ms/step" "$LOG"; else echo "bench/decode.py: FAILED (rc $DECODE)"; fi
    case "$ENGINE_BENCH" in
        0) grep -A4 "^ *batch" "$LOG" ;;
        skipped) echo "bench/engine.py: skipped (SKIP_ENGINE_BENCH)" ;;
        *) echo "bench/engine.py: FAILED (rc $ENGINE_BENCH)" ;;
    esac
    if [ -f "$OUT/kernels.json" ]; then
        "$PY" bench/kernels.py --print-summary "$OUT/kernels.json"
    fi
    [ "$BENCH" = 0 ] || echo "bench/kernels.py: FAILED (rc $BENCH)"
} 2>&1 | tee -a "$LOG"
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ] && [ "$ENGINE_TESTS" = 0 ] && [ "$DECODE" = 0 ] \
    && { [ "$ENGINE_BENCH" = 0 ] || [ "$ENGINE_BENCH" = skipped ]; }
