#!/usr/bin/env bash
# Device calls for issue 5, in steps chosen by env vars (each call must fit 600 s):
#   SUITE=<pytest paths>   the GPU tests of those paths (default: all of tests/; NO_SUITE=1 skips)
#   TUNE=<shape,...>       FC1 tuning (TUNE_DTYPES, default fp8) for those shapes, M 1-512,
#                          into $OUT/cache/tuned.json (copied to $OUT/tuned.json)
#   TUNED_IN=<file>        a tuned.json from an earlier call, used by the tuning and the benchmarks
#   BENCH=fc1,layer        the benchmarks to run (SHAPES, DTYPES, MS, REPS)
#   bash bench/layer_h100.sh <commit>
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
export DENSEMOE_CACHE_DIR=$OUT/cache
mkdir -p $DENSEMOE_CACHE_DIR
[[ -n ${TUNED_IN:-} ]] && cp "$TUNED_IN" $DENSEMOE_CACHE_DIR/tuned.json
if [[ -z ${NO_SUITE:-} ]]; then
  SUITE_PATHS=${SUITE:-tests} gpu_suite ${SUITE_TIMEOUT:-200}
fi
for shape in ${TUNE//,/ }; do
  for dt in ${TUNE_DTYPES:-fp8}; do
    timeout ${TUNE_TIMEOUT:-240} python3 -m densemoe tune --op fc1 --shape $shape --m ${TUNE_MS:-1-512} --dtypes $dt \
      --out $OUT/tune_fc1_${shape}_${dt}.md 2> $OUT/tune_fc1_${shape}_${dt}.log; tail -3 $OUT/tune_fc1_${shape}_${dt}.log
    cat $OUT/tune_fc1_${shape}_${dt}.md 2>/dev/null | cut -c1-200
  done
done
cp $DENSEMOE_CACHE_DIR/tuned.json $OUT/tuned.json 2>/dev/null || true
for what in ${BENCH//,/ }; do
  timeout ${BENCH_TIMEOUT:-170} python3 -m densemoe.bench $what --shapes ${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b} \
    --dtypes ${DTYPES:-fp8,bf16} --m ${MS:-1-512} --reps ${REPS:-20} --commit "$commit" --out $OUT/${what}_h100 > $OUT/${what}_h100.log 2>&1
  head -1 $OUT/${what}_h100.log | cut -c1-200; grep -c "WRONG\|failed" $OUT/${what}_h100.log
  grep -v "^#" $OUT/${what}_h100.log | cut -c1-300 | head -60
done
