#!/usr/bin/env bash
# Device calls for issue 5, in steps chosen by env vars (each call must fit 600 s):
#   SUITE=<pytest paths>   the GPU tests of those paths (default: all of tests/; NO_SUITE=1 skips)
#   TUNE=<shape[:dtype],...>  FC1 tuning for those shapes (dtype: fp8 or bf16; without one, every
#                          dtype of TUNE_DTYPES, default fp8), M 1-512,
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
for item in ${TUNE:+${TUNE//,/ }}; do
  shape=${item%%:*}; dts=${TUNE_DTYPES:-fp8}; [[ $item == *:* ]] && dts=${item#*:}
  for dt in $dts; do
    timeout ${TUNE_TIMEOUT:-240} python3 -m densemoe tune --op fc1 --shape $shape --m ${TUNE_MS:-1-512} --dtypes $dt --backends ${TUNE_BACKENDS:-triton} \
      --out $OUT/tune_fc1_${shape}_${dt}.md 2> $OUT/tune_fc1_${shape}_${dt}.log; tail -3 $OUT/tune_fc1_${shape}_${dt}.log
    cat $OUT/tune_fc1_${shape}_${dt}.md 2>/dev/null | cut -c1-200
  done
done
cp $DENSEMOE_CACHE_DIR/tuned.json $OUT/tuned.json 2>/dev/null || true
[[ -n ${BREAKDOWN:-} ]] && timeout 200 python3 bench/probes/layer_breakdown.py ${BREAKDOWN/:/ } 2>&1 | grep -v Warn | tee $OUT/breakdown.log | grep -v "^    "
[[ -n ${EXTRA:-} ]] && (eval "$EXTRA") 2>&1 | tee $OUT/extra.log
for what in ${BENCH:+${BENCH//,/ }}; do
  timeout ${BENCH_TIMEOUT:-170} python3 -m densemoe.bench $what --shapes ${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b} \
    --dtypes ${DTYPES:-fp8,bf16} --m ${MS:-1-512} --reps ${REPS:-20} --commit "$commit" --out $OUT/${what}_h100 > $OUT/${what}_h100.log 2>&1
  head -1 $OUT/${what}_h100.log | cut -c1-200; grep -c "WRONG\|failed" $OUT/${what}_h100.log
  grep -v "^#" $OUT/${what}_h100.log | cut -c1-300 | head -60
done
# at most 8 files come back: keep the results, tar the logs and tuning summaries
cd $OUT && rm -rf cache && tar czf logs.tgz $(ls *.log tune_*.md 2>/dev/null) 2>/dev/null && rm -f *.log tune_*.md; ls $OUT
