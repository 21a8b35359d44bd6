#!/usr/bin/env bash
# One device call for issue 5: the GPU suite (FC1, the layer, graph capture, no-sync), then the
# FC1 and whole-layer benchmarks (DeepSeek-V3 TP8 and Qwen3-30B-A3B, fp8 and bf16, M 1-512)
# into $OUT, then (TUNE=1) FC1 tuning for TP8 fp8 into $OUT/cache.
#   bash bench/layer_h100.sh <commit>
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
export DENSEMOE_CACHE_DIR=$OUT/cache
[[ -z ${NO_SUITE:-} ]] && gpu_suite ${SUITE_TIMEOUT:-200}
for what in fc1 layer; do
  timeout ${BENCH_TIMEOUT:-150} python3 -m densemoe.bench $what --shapes ${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b} \
    --dtypes fp8,bf16 --m ${MS:-1-512} --reps ${REPS:-20} --commit "$commit" --out $OUT/${what}_h100 > $OUT/${what}_h100.log 2>&1
  head -1 $OUT/${what}_h100.log | cut -c1-200; grep -c "WRONG\|failed" $OUT/${what}_h100.log
  grep -v "^#" $OUT/${what}_h100.log | cut -c1-230 | head -60
done
if [[ -n ${TUNE:-} ]]; then
  timeout ${TUNE_TIMEOUT:-150} python3 -m densemoe tune --op fc1 --shape deepseek-v3-tp8 --m 1-512 --dtypes fp8 \
    --out $OUT/tune_fc1_tp8_fp8.md 2> $OUT/tune_fc1.log; cat $OUT/tune_fc1_tp8_fp8.md
  cp $OUT/cache/tuned.json $OUT/tuned.json 2>/dev/null || true
fi
