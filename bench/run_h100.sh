#!/usr/bin/env bash
# One device call: GPU test suite, then the FC2 benchmark (all MISSION shapes, both dtypes, the
# M sweep) into $OUT. Usage on the GPU machine: bash bench/run_h100.sh <commit>
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
commit=${1:-unknown}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -15
python3 -m densemoe.bench fc2 --shapes deepseek-v3-tp8,deepseek-v3-tp4,qwen3-30b-a3b --dtypes fp8,bf16 \
  --m 1-512 --reps 50 --commit "$commit" --out $OUT/fc2_h100 > $OUT/fc2_h100.log 2>&1
head -2 $OUT/fc2_h100.log | cut -c1-250
grep -v "^#" $OUT/fc2_h100.log | sed -e 's/,use_tma=True//; s/block_//g; s/num_//g; s/,ctas_per_sm=1//; s/swap_ab=//'
tail -1 $OUT/fc2_h100.log
