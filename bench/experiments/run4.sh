# device run 4: layout experiment, ncu profiles, narrow sweeps of the other shapes
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 bench/experiments/fc2_wlayout.py 2>&1 | tee $OUT/wlayout.log
C16="block_m=16,block_n=64,block_k=256,num_warps=4,num_stages=6,swap_ab=True,use_tma=True,split=1,ctas_per_sm=1"
C128="block_m=128,block_n=64,block_k=256,num_warps=4,num_stages=4,swap_ab=True,use_tma=True,split=1,ctas_per_sm=1"
for spec in "16 $C16" "128 $C128" "16 cublas" "128 cublas"; do
  timeout 120 ncu --clock-control none -k "regex:_fc2_kernel|gemm|sm90|cutlass" --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    python3 bench/experiments/fc2_profile.py $spec > $OUT/ncu_$(echo $spec | cut -c1-12 | tr ' =,' '___').txt 2>&1
done
grep -h -E "Duration|DRAM Throughput|Memory Throughput|L2 Hit|L1/TEX Hit|Mem Busy|Max Bandwidth|Compute \(SM\)|Registers|Achieved Occupancy|Warp Cycles Per Issued|Function Name|^  [a-z_]" $OUT/ncu_*.txt | head -80
timeout 240 python3 -m densemoe.bench sweep --shapes qwen3-30b-a3b,deepseek-v3-tp4 --dtypes fp8 --m 16,128 --reps 20 --commit explore4 --out $OUT/sweep4 > $OUT/sweep4.log 2>&1
grep -A40 "best per point" $OUT/sweep4.log | sed -e "s/,use_tma=True//; s/block_//g; s/num_//g; s/,ctas_per_sm/,cps/; s/swap_ab=True,//"
