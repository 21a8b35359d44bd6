#!/usr/bin/env bash
# One device call: the GPU suite, the FC2 benchmark with the shipped tables (auto, triton, cute
# each timed, the heuristic beside every tuned point), then (TUNE_SHAPES) more tuning into
# $OUT/cache with whatever time is left.
#   bash bench/final_h100.sh <commit>
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
export DENSEMOE_CACHE_DIR=$OUT/cache
if [[ -n ${TESTS:-} ]]; then  # only these tests (pytest arguments), e.g. after a test-only change
  timeout ${SUITE_TIMEOUT:-150} python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS 2>&1 | tee $OUT/gpu_tests.log | tail -3
elif [[ -z ${NO_SUITE:-} ]]; then gpu_suite ${SUITE_TIMEOUT:-150}; fi
timeout ${BENCH_TIMEOUT:-300} python3 -m densemoe.bench fc2 --shapes ${SHAPES:-deepseek-v3-tp8,deepseek-v3-tp4,qwen3-30b-a3b} \
  --dtypes fp8,bf16 --m 1-512 --reps ${REPS:-20} --backends auto,triton,cute --commit "$commit" --out $OUT/fc2_h100_tuned \
  > $OUT/fc2_h100_tuned.log 2>&1
head -1 $OUT/fc2_h100_tuned.log | cut -c1-250; grep -c "FAIL\|WRONG" $OUT/fc2_h100_tuned.log; tail -1 $OUT/fc2_h100_tuned.log | cut -c1-200
[[ -f $OUT/fc2_h100_tuned.md ]] && grep "deepseek-v3-tp8" $OUT/fc2_h100_tuned.md | cut -d'|' -f2-10 | head -30
for spec in ${TUNE_SHAPES:-}; do  # shape:dtype
  timeout ${TUNE_TIMEOUT:-200} python3 -m densemoe tune --shape ${spec%%:*} --m 1-512 --dtypes ${spec##*:} \
    --out $OUT/tune_${spec%%:*}_${spec##*:}.md 2> $OUT/tune_${spec%%:*}_${spec##*:}.log
  grep -a "precompiled" $OUT/tune_${spec%%:*}_${spec##*:}.log
done
cp $OUT/cache/tuned.json $OUT/tuned.json 2>/dev/null || true
