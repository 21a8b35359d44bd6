#!/usr/bin/env bash
# compute-sanitizer over every kernel (issue 21): bench/sanitize_kernels.py (each kernel once per
# schedule at small shapes, each result checked) under memcheck, racecheck, synccheck and
# initcheck, one after the other, in one device call. Carry the CuTe DSL bundle (.carry, from
# ../shared/tools/cutedsl-bundle) for the CuTe kernels; without it they are left out (the log
# says which backends ran).
#
#   bash bench/sanitize_gpu.sh <commit>          (run with timeout_s=600)
#
# Writes $OUT/sanitize.tgz: one log per tool and summary.txt (each tool's "ERROR SUMMARY" line
# and the driver's last line). PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own
# allocation, so memcheck sees an access past a tensor's end (the caching allocator would hide it
# inside its pool). TOOLS and LIMIT (configs per op, dtype and M; 0: all) override the defaults;
# PER_TOOL caps each tool's seconds; FROM and TO run launches FROM <= i < TO of the driver's
# numbered list (`python3 bench/sanitize_kernels.py --list`), so one tool's run can be split over
# calls: each launch prints "ok <i> <s> <name>" as it ends, and the summary names the last one. Not run yet (2026-12-05): the time under each tool is unknown;
# if the call runs out, split it (TOOLS="memcheck racecheck", then TOOLS="synccheck initcheck").
# MATCH=<text>: only the launches whose name holds it (MATCH=cute-g-: the CuTe FC1 gathering x by TMA).
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
t0=$SECONDS
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
mkdir -p $OUT/sanitize
echo "commit $commit" > $OUT/sanitize/summary.txt
python3 bench/sanitize_kernels.py --list > $OUT/sanitize/what_ran.txt 2>&1
# once without a sanitizer: the results checked, and Triton's compile cache filled for the tools
timeout ${WARM:-150} python3 bench/sanitize_kernels.py --limit ${LIMIT:-0} ${FROM:+--from $FROM} ${TO:+--to $TO} ${MATCH:+--match "$MATCH"} 2>&1 | grep -av "^ok " | tail -3 | tee -a $OUT/sanitize/summary.txt
for tool in ${TOOLS:-memcheck racecheck synccheck initcheck}; do
  extra=""
  [[ $tool == memcheck ]] && extra="--leak-check no"
  [[ $tool == racecheck ]] && extra="--racecheck-report hazard"
  [[ $tool == initcheck ]] && extra="--track-unused-memory no"
  log=$OUT/sanitize/$tool.log
  timeout ${PER_TOOL:-140} compute-sanitizer --tool $tool $extra --print-limit 50 \
    python3 bench/sanitize_kernels.py --limit ${LIMIT:-0} ${FROM:+--from $FROM} ${TO:+--to $TO} ${MATCH:+--match "$MATCH"} > $log 2>&1
  rc=$?
  # the last launch that ended (a cut run resumes with FROM=<its number + 1>)
  echo "$tool: exit $rc at $((SECONDS - t0)) s; $(grep -a 'ERROR SUMMARY' $log | tail -1); $(grep -a '^# ' $log | tail -1); last: $(grep -a '^ok ' $log | tail -1 | cut -c1-120)" \
    | tee -a $OUT/sanitize/summary.txt
done
cd $OUT && tar czf sanitize.tgz sanitize && rm -rf sanitize
echo "# total $((SECONDS - t0)) s"
