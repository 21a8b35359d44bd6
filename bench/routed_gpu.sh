#!/usr/bin/env bash
# One device call for issue 19's benchmark on the H200, inside the 600 s limit of a call:
#   1. the GPU test suite (gpu_suite, bench/device_env.sh), at most SUITE_TIMEOUT s (200);
#   2. `python -m densemoe.bench layer` (the layer and its experts path: dense, skip and routed
#      forced, the chosen one, the cuBLAS fp8 pipeline, transformers' grouped_mm, torch's grouped
#      GEMMs, the routed floor), fp8 and bf16, M = 1 ... 4096, one process per shape so that a
#      shape cut short by its timeout (BENCH_TIMEOUT s each, 150) costs only its own results:
#      $OUT/layer_<h100 or h200>_<shape>.json, .md and .png (the plot: matplotlib is in the device image).
# Here, first: bash ../shared/tools/cutedsl-bundle (writes .carry/cutedsl.tar.xz, for the suite's
# CuTe DSL tests); then on the GPU machine, with carry [".carry"]:
#   bash bench/routed_gpu.sh <commit>
# with <commit> written here (git rev-parse --short HEAD), not computed there: the device copy's
# git named an older commit on 2026-12-05.
# Env: STAGES=1 adds bench/probes/routed_stages.py per shape (fp8); NO_SUITE=1 skips the suite;
# SHAPES (comma list), DTYPES, MS, REPS, SKIP_MAX_M (time the skip strategy only up to this M),
# SUITE_TIMEOUT, BENCH_TIMEOUT override the defaults below.
# Block-scaled fp8 (issue 20, dtype fp8block: routed path, its per-expert requantisation, torch's
# bf16 grouped pipeline on the dequantised weights) is NOT in the default DTYPES: with the suite
# the call would not fit in 600 s (times below). Run it as a second device call, without the suite:
#   NO_SUITE=1 DTYPES=fp8block bash bench/routed_gpu.sh <commit>
# its files are named layer_<h100 or h200>_<shape>_fp8block.* (any DTYPES other than the default adds
# _<dtypes> to the names).
#
# Time, measured on the H200 (2026-12-05): the whole GPU suite 128 s (603 tests, 8 pytest-xdist
# processes); the benchmark fp8 alone 47 s (TP8) and 40 s (Qwen3) of benchmark wall time, fp8 and
# bf16 84 s and 62 s, fp8block at 5 M 39 s and 30 s; STAGES ~30 s a shape; the call with the
# suite, fp8 and bf16 and STAGES took 393 s in all. So fp8, bf16 and fp8block together fit one
# call without the suite (estimate: ~2 x 160 s).
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
t_start=$SECONDS
[[ -z ${NO_SUITE:-} ]] && gpu_suite ${SUITE_TIMEOUT:-200}
echo "# suite done at $((SECONDS - t_start)) s"
for shape in $(echo "${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b}" | tr , ' '); do
  dtypes=${DTYPES:-fp8,bf16}
  tag=$([[ $dtypes == fp8,bf16 ]] || echo "_${dtypes//,/-}")
  out=$OUT/layer_${GPU_TAG}_${shape}${tag}
  timeout ${BENCH_TIMEOUT:-150} python3 -m densemoe.bench layer --shapes $shape --dtypes $dtypes \
    --m ${MS:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096} --reps ${REPS:-20} ${SKIP_MAX_M:+--skip-max-m $SKIP_MAX_M} \
    --commit "$commit" --out $out > $out.log 2>&1
  rc=$?  # 124: cut short by the timeout (nothing written for this shape)
  echo "# $shape: exit $rc at $((SECONDS - t_start)) s; $(grep -c "WRONG\|FAILED\|failed" $out.log) lines with WRONG / FAILED / failed"
  head -1 $out.log | cut -c1-200
  # the experts path, one line per M: every line's us (% of the routed floor); fp8 with the
  # baselines, bf16 the strategies only (the reply carries the last 12,000 characters; the .md
  # files hold everything)
  short='s/^experts //; s/cublas_fp8_pipeline/cublas/; s/hf_grouped_mm_bf16/hf_gmm/; s/torch_grouped/torch_g/; s/ routed floor / floor /'
  short="$short; s/routed_per_expert_fp8/pe_fp8/; s/ err block\/per-expert / err b\/pe /; s/ block\/per-expert / b\/pe /; s/ dense=- skip=-//"
  grep "^experts .* fp8 " $out.log | sed -e "$short" | cut -c1-230
  grep "^experts .* bf16 " $out.log | sed -e "$short" | cut -c1-170
  grep "^experts .* fp8block " $out.log | sed -e "$short" | cut -c1-250
  tail -1 $out.log | cut -c1-200
done
if [[ -n ${STAGES:-} ]]; then  # where the routed path's time goes, per launch (bench/probes/routed_stages.py)
  for shape in $(echo "${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b}" | tr , ' '); do
    timeout ${STAGES_TIMEOUT:-90} python3 bench/probes/routed_stages.py $shape fp8 ${STAGES_MS:-1,16,64,128,512,2048} \
      2>&1 | tail -8 | cut -c1-230
  done
fi
[[ -f $OUT/gpu_tests.log ]] && echo "# GPU suite:" && tail -2 $OUT/gpu_tests.log | cut -c1-300
# at most 8 files come back: the results (3 a shape), the logs in one tarball
cd $OUT && tar czf logs.tgz $(ls *.log 2>/dev/null) && rm -f *.log; ls -l $OUT
echo "# total $((SECONDS - t_start)) s"
