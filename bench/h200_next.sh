#!/usr/bin/env bash
# The next H200 session's first device call (docs/routed.md, "First H200 measurements ... and the
# plan"), inside the 600 s of a call, no CuTe bundle needed (carry nothing):
#   1. the routed and block-fp8 GPU tests (tests/test_routed_gpu.py, tests/test_block_fp8.py);
#   2. bench/probes/routed_fc2_rowscale.py: does the fp8 FC2 gain from keeping its MMAs in flight?
#   3. bench/probes/block_dense_stages.py skip: where block-scaled skip loses to per-expert;
#   4. the layer benchmark, fp8, both shapes, with the H200 routed table (tuned 2026-12-05);
#   5. bench/probes/routed_stages.py with the tuned configs.
# Then, in further calls: `DT="fp8 bf16 fp8block" OPS="routed strategy" bash bench/tune_h200.sh`
# (copy $OUT/wip to bench/results/h200_wip between calls), merge, and the full benchmark
# (`NO_SUITE=1 bash bench/routed_gpu.sh <commit>`, then DTYPES=fp8block).
#
#   bash bench/h200_next.sh <commit>      (commit written here: git rev-parse --short HEAD)
#
# Time, from the 2026-12-05 runs: tests ~75 s; the probes ~60 s each (estimated); benchmark fp8
# 47 + 40 s; stages ~30 s a shape: ~350 s, with PROBE_TIMEOUT / BENCH_TIMEOUT caps.
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
t0=$SECONDS
SUITE_PATHS="tests/test_routed_gpu.py tests/test_block_fp8.py" gpu_suite ${SUITE_TIMEOUT:-150}
echo "# tests done at $((SECONDS - t0)) s"
timeout ${PROBE_TIMEOUT:-90} python3 bench/probes/routed_fc2_rowscale.py 2>&1 | tail -7 | cut -c1-220
timeout ${PROBE_TIMEOUT:-90} python3 bench/probes/block_dense_stages.py skip 1,16,64 2>&1 | tail -4 | cut -c1-400
echo "# probes done at $((SECONDS - t0)) s"
for shape in deepseek-v3-tp8 qwen3-30b-a3b; do
  out=$OUT/layer_h200_${shape}_fp8_tuned
  timeout ${BENCH_TIMEOUT:-100} python3 -m densemoe.bench layer --shapes $shape --dtypes fp8 \
    --m 1,2,4,8,16,32,64,128,256,512,1024,2048,4096 --reps 20 --commit "$commit" --out $out > $out.log 2>&1
  echo "# $shape: exit $? at $((SECONDS - t0)) s"
  grep "^experts .* fp8 " $out.log | sed -e 's/^experts //; s/cublas_fp8_pipeline/cublas/; s/hf_grouped_mm_bf16/hf_gmm/' \
    | cut -c1-230
  timeout 60 python3 bench/probes/routed_stages.py $shape fp8 16,128,512,2048 2>&1 | tail -5 | cut -c1-230
done
cd $OUT && tar czf logs.tgz $(ls *.log 2>/dev/null) && rm -f *.log; ls $OUT
echo "# total $((SECONDS - t0)) s"
