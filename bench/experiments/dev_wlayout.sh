set -uo pipefail
mkdir -p /tmp/site && xz -T16 -dc .carry/cutedsl.tar.xz | tar -x -C /tmp/site
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 300 python3 bench/experiments/cute_wlayout.py --m 1,16,64,128,256 --out $OUT 2>&1 | tee $OUT/wlayout.log | grep -v "^$"
for M in 16 64; do
  timeout 90 ncu --kernel-name regex:kernel_cutlass --launch-skip 2 --launch-count 1 --set full --page raw \
    python3 bench/experiments/cute_ncu.py $M cute > $OUT/ncu_raw_cute_M$M.txt 2>&1
  grep -E "gpu__time_duration.sum|dram__throughput.avg.pct|pipe_tensor.*(pct|ratio)|warp_issue_stalled.*per_warp_active.pct|issue_stalled_.*_per_warp_active" $OUT/ncu_raw_cute_M$M.txt | grep -v "not_issued" | awk '$NF+0 > 1.0 || /time_duration|dram|tensor/' | head -40
done
