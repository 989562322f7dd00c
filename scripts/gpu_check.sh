#!/usr/bin/env bash
# One command for a lent GPU: correctness of the triton backend on CUDA, the layer / model / scripts
# on CUDA, the hybrid (GDN + attention) model, then the per-rank benchmark. Four groups, each well inside the device tool's 10 minutes
# per call, so a session runs them as separate calls (or all at once where no such limit applies):
#
#   scripts/gpu_check.sh op        # 1-3 below: op correctness, fp32 and bf16     (step limits 5.5 min)
#   scripts/gpu_check.sh model     # 4: numerical check, FLA loss kernels, training, memory on CUDA (step limits 9 min)
#   scripts/gpu_check.sh attention # 4b: attention kernels, hybrid model CP vs one process (limits 7 min)
#   scripts/gpu_check.sh qwen      # 4c: transformers' Qwen3.5 / Qwen3-Next under CP vs transformers (limits 6 min)
#   scripts/gpu_check.sh torchtitan # 4d: the torchtitan plugin on the GPU vs on the CPU (limit 6 min)
#   scripts/gpu_check.sh bench     # 5: scripts/bench_op.py                       (limit 9 min)
#   scripts/gpu_check.sh           # all six
#   BENCH_ARGS="--T 32768 --P 4 --shapes main" scripts/gpu_check.sh bench
#
# 1. FLA: install the wheels carried in .whl/ (no network on the GPU machine) unless FLA 0.6.0 is
#    already importable; fla_cp itself runs from this checkout (PYTHONPATH). The wheels are pure
#    Python; fetch them on a machine with a package registry and carry `.whl` (git-ignored):
#      pip download --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops -d .whl
# 2. Correctness on CUDA, fp32 (TRITON_F32_DEFAULT=ieee so FLA's fp32 dots are IEEE, not TF32, and the
#    1e-5 bar is meaningful): our summary kernels and FLA's short conv compiled
#    (tests/cp/ops/test_triton_kernels.py, test_short_conv.py::test_causal_conv_fla_compiled_cuda) and the
#    whole operator with backend="triton" -- gloo ranks P = 2, 3 sharing the one GPU, plus single
#    process -- vs the torch backend and FLA's naive recurrence (tests/cp/ops/test_op_triton_interpret.py).
# 3. bf16 (default TF32 settings): the operator in bf16 vs fp32 on the same inputs, rel err <= 3e-3,
#    P = 1 and 2; and our bf16 summaries vs fp32.
#    Then the one kernel vocabulary on CUDA (backend= and its deprecated old names pick the same kernels)
#    and fla_cp patching nothing in Triton when compiled (tests/cp/ops/test_backend_names.py,
#    test_no_triton_patches.py).
#    Steps 2-3 run untuned (FLA_CP_AUTOTUNE=0, which the test suite's patches of
#    scripts/triton_patches.py extend to FLA's autotuners: their first config; fla_cp itself patches
#    nothing in Triton): tuning every kernel for every test shape would compile for minutes on a fresh machine.
# 4. The model on CUDA with 2 gloo ranks on the one GPU (scripts/run_cp_tests.sh's steps): the
#    numerical check (CP vs one device, fp32 with IEEE dots and bf16), FLA's fused loss kernels vs
#    torch's cross-entropy (one process), 20 training steps in bf16, and
#    per-rank peak memory at cp_size 1 and 2; untuned too (memory does not depend on the config): the
#    scripts run under scripts/triton_patches.py, which applies the same patches first.
# 4b. Hybrid models: scripts/check_attention_cuda.py (each attention kernel of a local part: flash-attn's
#    varlen function in bf16 when flash-attn is installed, torch SDPA in bf16 and fp32, vs fp64 math),
#    then tests/cp/test_numerical_correctness.py --hybrid (GDN layers plus full and windowed attention):
#    CP=2 vs one process in fp32 (SDPA) and bf16 (flash-attn when installed, else SDPA), and CP=2 zigzag
#    with the attention layers forced onto SDPA against the same reference.
# 4c. transformers' Qwen3.5 and Qwen3-Next (scripts/check_qwen_cuda.py): our CP models vs transformers'
#    own model on CUDA (its GDN layers on FLA's kernels, attention on SDPA; ours on FLA's kernels and our
#    Triton summaries, attention on flash-attn in bf16 when installed), one process and CP=2 (gloo ranks
#    on the one GPU): loss, logits, gradients, greedy generation, fp32 (IEEE dots) and bf16.
# 4d. The torchtitan plugin (scripts/torchtitan_check.sh, RUNS=gpu1): per config (torchtitan's Qwen3.5, our
#    hybrid GatedDeltaNet) a seed checkpoint, then 2 steps of torchtitan's Trainer in one process on the GPU
#    (FLA's Triton kernels, flash-attn / SDPA; fp32) against the same on the CPU, step 1 within 1e-4. One GPU
#    can't hold a CP run (torchtitan gives each rank its own device): with 2 / 4 GPUs run
#    `RUNS="cp2 dp2cp2" scripts/torchtitan_check.sh`. Needs torchtitan 0.3.0: carry its wheels with
#    the others (`pip download torchtitan==0.3.0 "datasets==4.1.1" -d .whl`, dependencies included).
# 5. scripts/bench_op.py: the per-rank cost table (BENCH_ARGS passed through), autotuned.
# Every step has a time limit; the summary at the end says what passed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1   # a step killed at its limit still leaves what it printed in its log
PY=${PYTHON:-$(command -v python3 || command -v python)}   # the GPU image has python3 only
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
BENCH_ARGS=${BENCH_ARGS:-}
STEPS=${*:-op model attention qwen torchtitan bench}
for group in $STEPS; do
  case $group in op|model|attention|qwen|torchtitan|bench) ;; *) echo "unknown group '$group' (op, model, attention, qwen, torchtitan, bench)"; exit 2 ;; esac
done
wants() { [[ " $STEPS " == *" $1 "* ]]; }
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=2"
# runs a script with the suite's Triton patches (FLA_CP_AUTOTUNE=0 reaching FLA's autotuners): fla_cp applies none
PATCHED=scripts/triton_patches.py

source scripts/_summary.sh   # summary_table
declare -a NAMES STATUS TIMES
run() {  # run NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); TIMES+=("$((SECONDS - t0))s")
  if [ "$rc" -eq 0 ]; then STATUS+=("PASS"); elif [ "$rc" -eq 124 ]; then STATUS+=("TIMEOUT"); else STATUS+=("FAIL (exit $rc)"); fi
}

# --- 1. FLA -----------------------------------------------------------------------------------
if ! $PY -c "import fla, sys; sys.exit(fla.__version__ != '0.6.0')" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "=== installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    # into a folder of our own: the image's environment may not be writable
    $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fla_site .whl/*.whl || echo "pip install of .whl/ failed"
    export PYTHONPATH="$PYTHONPATH:/tmp/fla_site"
  else
    echo "FLA 0.6.0 is not importable and no wheels are carried in .whl/"
  fi
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/env.log"
import torch, triton
try:
    import fla
    fla_version = fla.__version__
except Exception as e:  # noqa: BLE001
    fla_version = f"not importable ({e})"
print(f"torch {torch.__version__} | cuda {torch.version.cuda} | triton {triton.__version__} | fla {fla_version}")
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA'}")
EOF
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "no CUDA device: nothing to check"; exit 1; }

# --- 2. fp32 correctness on CUDA ----------------------------------------------------------------
if wants op; then
  # untuned launches, ours and FLA's: many tiny shapes, where tuning every one would cost more than
  # the tests (FLA's kernels through scripts/triton_patches.py: untuned_autotuners, which the suite applies)
  export FLA_CP_AUTOTUNE=0
  # (the compile-for-sm_80/90 test is left to CI: on a GPU the suite runs the compiled kernels themselves)
  run fp32_kernels 90 env TRITON_F32_DEFAULT=ieee $PY -m pytest -q -x tests/cp/ops/test_triton_kernels.py \
      tests/cp/layers/test_short_conv.py::test_causal_conv_fla_compiled_cuda -k "not bf16 and not compile" \
      -p no:cacheprovider
  run fp32_operator 150 env TRITON_F32_DEFAULT=ieee $PY -m pytest -q -x tests/cp/ops/test_op_triton_interpret.py \
      -k "not bf16" -p no:cacheprovider

  # --- 3. bf16 ----------------------------------------------------------------------------------
  run bf16 90 $PY -m pytest -q tests/cp/ops/test_op_triton_interpret.py tests/cp/ops/test_triton_kernels.py \
      -k bf16 -p no:cacheprovider
  # one kernel vocabulary (backend=) on CUDA: the old names pick the same kernels, and importing and
  # running fla_cp patches nothing in Triton (the compiled case of test_no_triton_patches)
  run backends 120 $PY -m pytest -q tests/cp/ops/test_backend_names.py tests/cp/ops/test_no_triton_patches.py \
      -p no:cacheprovider
  unset FLA_CP_AUTOTUNE
fi

# --- 4. the model on CUDA -----------------------------------------------------------------------
if wants model; then
  export FLA_CP_AUTOTUNE=0
  run model_reference 100 env TRITON_F32_DEFAULT=ieee $PY $PATCHED tests/cp/test_numerical_correctness.py \
      --mode single --save_ref --ref "$OUT/reference.pt" --train_steps 3
  run model_cp2 100 env TRITON_F32_DEFAULT=ieee $TORCHRUN $PATCHED tests/cp/test_numerical_correctness.py \
      --mode cp --cp_size 2 --ref "$OUT/reference.pt"
  run model_loss 60 $PY -m pytest -q tests/cp/models/test_model_cp.py -k fla_loss_kernels_on_cuda -p no:cacheprovider
  run train_cp2 100 $TORCHRUN $PATCHED tests/cp/train_cp_real.py --cp_size 2 --steps 20 --warmup 2 --seq_len 8192 \
      --batch_size 2 --bf16 --save_dir "$(mktemp -d)"
  run memory_cp1 90 $PY $PATCHED tests/cp/benchmark_memory.py --cp_size 1 --seq_lens 8192,32768 \
      --results_dir "$OUT/memory"
  run memory_cp2 90 $TORCHRUN $PATCHED tests/cp/benchmark_memory.py --cp_size 2 --seq_lens 8192,32768 \
      --results_dir "$OUT/memory" --plot "$OUT/memory_gpu.png"
  unset FLA_CP_AUTOTUNE
fi

# --- 4b. hybrid models: the attention kernels and the GDN + attention model on CUDA --------------
if wants attention; then
  export FLA_CP_AUTOTUNE=0
  # each kernel of a part (flash-attn varlen in bf16 when installed, SDPA in bf16 and fp32) vs fp64 math
  run attention_kernels 120 $PY scripts/check_attention_cuda.py
  # the hybrid model, CP=2 vs one process, fp32 (SDPA; IEEE dots) and bf16 (flash-attn when installed),
  # then CP with the attention layers forced onto SDPA against the same reference
  run hybrid_reference 100 env TRITON_F32_DEFAULT=ieee $PY $PATCHED tests/cp/test_numerical_correctness.py \
      --mode single --hybrid --save_ref --ref "$OUT/hybrid_reference.pt" --train_steps 3
  run hybrid_cp2 100 env TRITON_F32_DEFAULT=ieee $TORCHRUN $PATCHED tests/cp/test_numerical_correctness.py \
      --mode cp --hybrid --cp_size 2 --ref "$OUT/hybrid_reference.pt"
  run hybrid_cp2_sdpa_zigzag 100 env TRITON_F32_DEFAULT=ieee $TORCHRUN $PATCHED tests/cp/test_numerical_correctness.py \
      --mode cp --hybrid --cp_size 2 --cp_layout zigzag --attention_kernel sdpa --ref "$OUT/hybrid_reference.pt"
  unset FLA_CP_AUTOTUNE
fi

# --- 4c. transformers' Qwen3.5 / Qwen3-Next -----------------------------------------------------
if wants qwen; then
  export FLA_CP_AUTOTUNE=0
  run qwen_one_process 150 env TRITON_F32_DEFAULT=ieee $PY $PATCHED scripts/check_qwen_cuda.py
  run qwen_cp2 200 env TRITON_F32_DEFAULT=ieee $TORCHRUN $PATCHED scripts/check_qwen_cuda.py
  unset FLA_CP_AUTOTUNE
fi

# --- 4d. the torchtitan plugin --------------------------------------------------------------------
if wants torchtitan; then
  if $PY -c "import torchtitan" 2>/dev/null; then
    run torchtitan_gpu1 360 env TRITON_F32_DEFAULT=ieee RUNS=gpu1 RTOL=1e-4 OUT="$OUT/torchtitan" \
        bash scripts/torchtitan_check.sh qwen3_5_tiny gdn_hybrid_tiny
  else
    echo "torchtitan is not importable (carry its wheels in .whl/): skipping the torchtitan group"
    NAMES+=("torchtitan_gpu1"); STATUS+=("SKIPPED"); TIMES+=("0s")
  fi
fi

# --- 5. benchmark -------------------------------------------------------------------------------
if wants bench; then
  # shellcheck disable=SC2086
  run bench_op 540 $PY scripts/bench_op.py --rep 25 $BENCH_ARGS
fi

summary_table 16; failed=$?
echo "  total ${SECONDS}s; logs in $OUT/"
echo "========================================================================="
exit $failed
