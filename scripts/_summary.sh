# Sourced by gpu_check.sh and run_cp_tests.sh: the table of steps at the end of a run.
#   NAMES, STATUS, TIMES  one entry per step, filled by the sourcing script's run()
#   summary_table WIDTH   prints the banner and a row per step (name padded to WIDTH); returns 1 when
#                         a step did not PASS (or none ran), else 0
summary_table() {
  local width=$1 i failed=0
  echo
  echo "================================ summary ================================"
  for i in "${!NAMES[@]}"; do
    printf "  %-${width}s %-16s %s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${TIMES[$i]}"
    [ "${STATUS[$i]}" = "PASS" ] || failed=1
  done
  [ "${#NAMES[@]}" -gt 0 ] || { echo "  no steps ran"; failed=1; }
  return $failed
}
