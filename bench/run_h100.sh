#!/usr/bin/env bash
# One device call: GPU test suite (Triton and CuTe backends), then the FC2 benchmark (MISSION
# shapes, both dtypes, the M sweep, both backends side by side) into $OUT, then Nsight Compute
# on the CuTe kernel. Usage on the GPU machine (with .carry/cutedsl.tar.xz carried):
#   bash bench/run_h100.sh <commit>
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
[[ -z ${NO_SUITE:-} ]] && gpu_suite 320
timeout 330 python3 -m densemoe.bench fc2 --shapes ${SHAPES:-deepseek-v3-tp8,deepseek-v3-tp4,qwen3-30b-a3b} \
  --dtypes fp8,bf16 --m 1-512 --reps ${REPS:-30} --backends ${BACKENDS:-triton,cute} --commit "$commit" --out $OUT/fc2_h100 \
  > $OUT/fc2_h100.log 2>&1
head -1 $OUT/fc2_h100.log | cut -c1-250
grep -v "^#" $OUT/fc2_h100.log | grep "deepseek-v3-tp8 fp8" | sed -e 's/,use_tma=True//; s/block_//g; s/num_//g; s/,ctas_per_sm=1//; s/swap_ab=//; s/stages=0,//; s/,ctas=0//' | cut -c1-200
tail -1 $OUT/fc2_h100.log
if command -v ncu >/dev/null && [[ -n ${NCU:-} ]]; then
  for M in $NCU; do
    timeout 60 ncu --kernel-name regex:kernel_cutlass --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 bench/probes/cute_ncu.py $M cute > $OUT/ncu_cute_M$M.txt 2>&1
    grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Stall|Warp Cycles Per Issued" $OUT/ncu_cute_M$M.txt | head -14
  done
fi
