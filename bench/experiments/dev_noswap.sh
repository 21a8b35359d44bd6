# One device call: CuTe GPU tests, then the non-swapped (tokens as wgmma M) config grid, then
# Nsight Compute on one config ($NCU_CFG at M=$NCU_M).
set -uo pipefail
mkdir -p /tmp/site && xz -T16 -dc .carry/cutedsl.tar.xz | tar -x -C /tmp/site
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu tests/test_fc2_cute.py -k "${TESTK:-pinned or graph}" -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests_cute.log | tail -4
timeout 280 python3 bench/experiments/cute_sweep.py --space noswap --skip-check --m ${MS:-256,384,512} --out $OUT \
  2>&1 | tee $OUT/noswap.log | grep -E "SUMMARY|FAIL|ceiling"
if [[ -n ${NCU_CFG:-} ]]; then
  timeout 90 ncu --kernel-name regex:kernel_cutlass --launch-skip 2 --launch-count 1 --set full --page raw \
    python3 bench/experiments/cute_ncu.py ${NCU_M:-512} cute "$NCU_CFG" > $OUT/ncu_raw.txt 2>&1
  grep -E "gpu__time_duration.sum|dram__bytes_read.sum |dram__throughput.avg.pct_of_peak_sustained_elapsed|lts__t_sectors_srcunit_tex_op_read.sum |lts__t_sectors.avg.pct_of_peak_sustained_elapsed|sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active|pcsamp_warps_issue_stalled_(long_scoreboard|wait|barrier|warpgroup_arrive|selected|membar|short_scoreboard|math_pipe_throttle|dispatch_stall|no_instructions) " $OUT/ncu_raw.txt | awk '{print $1, $(NF-1), $NF}'
fi
