#!/usr/bin/env bash
# One device call: the tuning GPU tests, then `python -m densemoe tune` for one shape / dtype /
# M range, with the cache written under $OUT (bring it back, merge it into
# src/densemoe/tuning/tables/h100.json). A whole sweep does not fit one 10-minute call: split M.
#   SHAPE=deepseek-v3-tp8 DT=fp8 MS=1-64 bash bench/tune_h100.sh
set -uo pipefail
if [[ -f .carry/cutedsl.tar.xz ]]; then
  mkdir -p /tmp/site && xz -T16 -dc .carry/cutedsl.tar.xz | tar -x -C /tmp/site
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 DENSEMOE_CACHE_DIR=$OUT/cache
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [[ -z ${SKIP_TESTS:-} ]]; then
  timeout 120 python3 -m pytest -q -m gpu tests/test_tuning.py tests/test_fc2_cute.py -k "tuner or expert_slices" \
    -p no:cacheprovider 2>&1 | tail -3
fi
timeout ${TUNE_TIMEOUT:-420} python3 -m densemoe tune --shape ${SHAPE:-deepseek-v3-tp8} --m ${MS:-1-64} \
  --dtypes ${DT:-fp8} --out $OUT/tune_${SHAPE:-deepseek-v3-tp8}_${DT:-fp8}_${MS:-1-64}.md 2> $OUT/tune.log
tail -5 $OUT/tune.log
cp $OUT/cache/tuned.json $OUT/tuned_${SHAPE:-deepseek-v3-tp8}_${DT:-fp8}_${MS:-1-64}.json 2>/dev/null || true
