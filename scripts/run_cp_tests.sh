#!/usr/bin/env bash
# Numerical check (reference, then CP) and memory benchmark (cp_size=1 baseline, then CP), in
# sequence, with a summary at the end -- like TransformerEngine's run_context_parallel.sh.
#
#   scripts/run_cp_tests.sh                 # CP=2 on this machine (CPU: gloo; GPUs: NCCL)
#   CP_SIZE=4 SEQ_LENS=1024,2048,4096,8192,16384 MODEL=base scripts/run_cp_tests.sh
#
# Environment: CP_SIZE (2), SEQ_LENS (memory benchmark lengths; 1024,2048,4096), MODEL (memory
# benchmark model preset; small), TRAIN_STEPS (golden training steps; 3), OUT (work dir; runs/cp_tests).
set -u
cd "$(dirname "$0")/.."
CP_SIZE=${CP_SIZE:-2}
SEQ_LENS=${SEQ_LENS:-1024,2048,4096}
MODEL=${MODEL:-small}
TRAIN_STEPS=${TRAIN_STEPS:-3}
OUT=${OUT:-runs/cp_tests}
# the numerical check needs >= 2 ranks (one would compare cp_size=1 with itself): say so before any run
case "$CP_SIZE" in
  *[!0-9]*|0|1) echo "CP_SIZE must be an integer >= 2, got '$CP_SIZE'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
PY=${PYTHON:-python}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=$CP_SIZE"

source scripts/_summary.sh   # summary_table
declare -a NAMES STATUS TIMES
run() {  # run NAME CMD...
  local name=$1; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); TIMES+=("$((SECONDS - t0))s")
  if [ "$rc" -eq 0 ]; then STATUS+=("PASS"); else STATUS+=("FAIL (exit $rc)"); fi
}

run numerical_reference $PY tests/cp/test_numerical_correctness.py --mode single --save_ref \
    --ref "$OUT/reference.pt" --train_steps "$TRAIN_STEPS"
run numerical_cp$CP_SIZE $TORCHRUN tests/cp/test_numerical_correctness.py --mode cp --cp_size "$CP_SIZE" \
    --ref "$OUT/reference.pt"
run memory_cp1 $PY tests/cp/benchmark_memory.py --cp_size 1 --seq_lens "$SEQ_LENS" --model_config "$MODEL" \
    --results_dir "$OUT/memory"
run memory_cp$CP_SIZE $TORCHRUN tests/cp/benchmark_memory.py --cp_size "$CP_SIZE" --seq_lens "$SEQ_LENS" \
    --model_config "$MODEL" --results_dir "$OUT/memory" --plot "$OUT/memory.png"

summary_table 22; failed=$?
echo "  numerical checks:"; grep -h "checks passed" "$OUT"/numerical_cp*.log | sed 's/^/   /'
echo "  memory (cp_size=$CP_SIZE vs 1):"; grep -hE "^ [0-9,]+ +\|" "$OUT/memory_cp$CP_SIZE.log" | sed 's/^/   /'
echo "  logs: $OUT/*.log, plot: $OUT/memory.png"
echo "========================================================================="
exit $failed
