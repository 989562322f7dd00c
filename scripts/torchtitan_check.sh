#!/usr/bin/env bash
# fla_cp's torchtitan plugin, checked end to end: for each config a seed checkpoint, one process, then
# CP = 2 (2 ranks) and dp_shard 2 x CP 2 (4 ranks) from it, all through `torchrun -m torchtitan.train
# --module fla_cp.integrations.torchtitan`. Step 1's loss and grad norm must equal one process's within
# 1e-5 (relative), later steps within 1e-4 (AdamW's sign-like first updates; see
# fla_cp/integrations/torchtitan/check.py). Prints a table; exits 1 on any mismatch or failed run.
#
#   scripts/torchtitan_check.sh                          # qwen3_5_tiny gdn_tiny gdn_hybrid_tiny, CPU/gloo: ~4 min on 2 cores
#   scripts/torchtitan_check.sh qwen3_5_tiny             # some configs
#   RUNS=cp2 OUT=/tmp/ttc scripts/torchtitan_check.sh    # only CP=2; logs and metrics under $OUT/<config>/
#   RUNS=gpu1 RTOL=1e-4 scripts/torchtitan_check.sh      # one GPU: one process on the GPU vs on the CPU
#
# On a machine with GPUs torchtitan runs NCCL on them (cp2 needs 2 GPUs, dp2cp2 4); without, the
# plugin's CPU shims apply (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
CONFIGS=${*:-qwen3_5_tiny gdn_tiny gdn_hybrid_tiny}
# shellcheck disable=SC2086
exec "$PY" -m fla_cp.integrations.torchtitan.check --configs $CONFIGS --runs ${RUNS:-cp2 dp2cp2} \
    --out "${OUT:-torchtitan_check_out}" ${RTOL:+--rtol "$RTOL"}
