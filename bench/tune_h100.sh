#!/usr/bin/env bash
# One device call: (SUITE=1) the GPU test suite, then `python -m densemoe tune` for one shape /
# dtype / M range with the cache written under $OUT/cache (bring tuned_*.json back and merge it
# into src/densemoe/tuning/tables/h100.json with bench/merge_tuned.py).
#   SUITE=1 SHAPE=deepseek-v3-tp8 DT=fp8 MS=1-512 bash bench/tune_h100.sh
set -uo pipefail
source bench/device_env.sh
export DENSEMOE_CACHE_DIR=$OUT/cache
[[ -n ${SUITE:-} ]] && gpu_suite ${SUITE_TIMEOUT:-200}
for shape in ${SHAPE:-deepseek-v3-tp8}; do
  for dt in ${DT:-fp8}; do
    tag=${shape}_${dt}_${MS:-1-512}
    timeout ${TUNE_TIMEOUT:-380} python3 -m densemoe tune --shape $shape --m ${MS:-1-512} --dtypes $dt \
      --out $OUT/tune_$tag.md 2> $OUT/tune_$tag.log
    grep -a "precompiled" $OUT/tune_$tag.log; grep -ac "dropped" $OUT/tune_$tag.log; cat $OUT/tune_$tag.md
  done
done
cp $OUT/cache/tuned.json $OUT/tuned.json 2>/dev/null || true
