#!/usr/bin/env bash
# One device call for issue 19's benchmark on the H200, inside the 600 s limit of a call:
#   1. the GPU test suite (gpu_suite, bench/device_env.sh), at most SUITE_TIMEOUT s (200);
#   2. `python -m densemoe.bench layer` (the layer and its experts path: dense, skip and routed
#      forced, the chosen one, the cuBLAS fp8 pipeline, transformers' grouped_mm, torch's grouped
#      GEMMs, the routed floor), fp8 and bf16, M = 1 ... 4096, one process per shape so that a
#      shape cut short by its timeout (BENCH_TIMEOUT s each, 150) costs only its own results:
#      $OUT/layer_h200_<shape>.json, .md and .png (the plot: matplotlib is in the device image).
# Here, first: bash ../shared/tools/cutedsl-bundle (writes .carry/cutedsl.tar.xz, for the suite's
# CuTe DSL tests); then on the GPU machine, with carry [".carry"]:
#   bash bench/routed_gpu.sh <commit>
# Env: STAGES=1 adds bench/probes/routed_stages.py per shape (fp8; ~60 s each, estimated); NO_SUITE=1 skips the suite; SHAPES (comma list), DTYPES, MS, REPS, SKIP_MAX_M (time the skip
# strategy only up to this M), SUITE_TIMEOUT, BENCH_TIMEOUT override the defaults below.
# Block-scaled fp8 (issue 20, dtype fp8block: routed path, its per-expert requantisation, torch's
# bf16 grouped pipeline on the dequantised weights) is NOT in the default DTYPES: with it the call
# would not fit in 600 s (estimate below). Run it as a second device call, without the suite:
#   NO_SUITE=1 DTYPES=fp8block bash bench/routed_gpu.sh <commit>
# its files are named layer_h200_<shape>_fp8block.* (any DTYPES other than the default adds
# _<dtypes> to the names).
#
# Time, estimated (no run of this script has been timed yet):
#   suite: 196 GPU tests took 88 s under 8 pytest-xdist processes on the H100 (docs/tuning.md);
#     the suite is ~3x that now plus the routed path's tests: budget 200 s, its timeout (a suite
#     cut short prints its tail and the benchmark still runs).
#   benchmark, per shape: ~20 s to start (imports, read ceiling and GEMM peaks, weights, the
#     transformers modules). Per M, ~18 callables (the layer's 6 as before, the experts path's
#     ~12) x 3 interleaved rounds, each a Timer call: ~6 ms of settling reads, one graph capture,
#     20 replays behind a 256 MB read flush (~60 us each): ~25-40 ms a call while M <= 512, so
#     ~2-3 s per M with the fp32 reference, the checks and the router timings (the H100 layer run,
#     6 callables, 13 M x 2 shapes, took 75 s with its compiles). At M = 4096 the slow lines
#     (dense and skip ~10 ms in fp8, ~20 ms in bf16 on DeepSeek-V3 TP8; the cuBLAS pipeline
#     ~15 ms) make a round ~4 s: 1024 + 2048 + 4096 ~ 25 s. Triton compiles for new M and the
#     routed kernels' configs: ~40 s. Total ~ 20 + 10 x 3 + 25 + 40 = ~115 s a shape: limit 150.
#     M = 96, 192 and 384 of the decode sweep are left out to keep that margin (MS puts them back).
#   all: 200 + 2 x 150 + ~20 s (bundle unpacking, nvidia-smi, the tarball) = ~520 s, < 9 min.
#   fp8block (estimated, not run yet): per M its layer line and experts-only (2 callables) and on the
#     experts path torch_grouped, routed (chosen is timed once with it), per-expert fp8 routed (3),
#     plus a second fp32 reference per M; at start ~5 s to quantise per block, dequantise (fp32:
#     5.6 GB on DeepSeek-V3 TP8) and requantise per expert; the block-scaled routed kernels' compiles
#     ~30-40 s. Added to fp8,bf16: ~23 callables a round instead of ~18, ~115 x 23/18 + 40 ~ 185 s
#     a shape: 200 + 2 x 185 + 20 = 590 s, no margin: hence the separate call. Alone
#     (DTYPES=fp8block: the layer's cuBLAS and grouped_mm baselines, ours, experts-only; the experts
#     path's cuBLAS, grouped_mm, torch_grouped, routed, per-expert: ~9 callables): ~20 + 10 x 1.5
#     + ~20 (M >= 1024) + ~60 compiles ~ 115 s a shape, under BENCH_TIMEOUT 150: ~2 x 130 + 20 ~ 280 s.
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
t_start=$SECONDS
[[ -z ${NO_SUITE:-} ]] && gpu_suite ${SUITE_TIMEOUT:-200}
echo "# suite done at $((SECONDS - t_start)) s"
for shape in $(echo "${SHAPES:-deepseek-v3-tp8,qwen3-30b-a3b}" | tr , ' '); do
  dtypes=${DTYPES:-fp8,bf16}
  tag=$([[ $dtypes == fp8,bf16 ]] || echo "_${dtypes//,/-}")
  out=$OUT/layer_h200_${shape}${tag}
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
