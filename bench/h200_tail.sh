#!/usr/bin/env bash
# FC1's tail tiles on the H200 (issue 19; sixth session): the refinement of the large-M routed
# entries (bench/refine_tail.py: each bucket's tuned config with and without fc1_tail_m, through
# the tuner), then the fp8 layer benchmark at M >= 256 reading that cache on top of the shipped
# tables. One tarball comes back (next.tgz: wip/tuned.json for bench/merge_tuned.py, the logs,
# the benchmark's JSON/markdown).
#
#   bash bench/h200_tail.sh <commit>     (timeout_s=600; carry nothing)
set -uo pipefail
commit=${1:-unknown}
t0=$SECONDS
source bench/device_env.sh
export DENSEMOE_CACHE_DIR=$OUT/wip
mkdir -p $DENSEMOE_CACHE_DIR
timeout ${REFINE_TIMEOUT:-240} python3 bench/refine_tail.py ${REFINE_ARGS:-} > $OUT/refine_tail.log 2>&1
echo "# refine: exit $? at $((SECONDS - t0)) s"; grep "^tail" $OUT/refine_tail.log | cut -c1-300
for shape in ${LAYER_SHAPES:-qwen3-30b-a3b deepseek-v3-tp8}; do
  left=$((560 - (SECONDS - t0)))
  [ $left -lt 40 ] && { echo "# layer $shape: skipped, ${left} s left"; continue; }
  out=$OUT/layer_h200_${shape}_fp8
  timeout $((left < 100 ? left : 100)) python3 -m densemoe.bench layer --shapes $shape --dtypes fp8 \
    --m ${LAYER_M:-256,512,1024,2048,4096} --reps 20 --skip-max-m 512 --commit "$commit" --out $out > $out.log 2>&1
  echo "# layer $shape: exit $? at $((SECONDS - t0)) s"
  grep "^experts .* fp8 " $out.log | sed -e 's/^experts //; s/cublas_fp8_pipeline/cublas/; s/hf_grouped_mm_bf16/hf_gmm/' | cut -c1-200
done
# outside $OUT, then moved in (h200_next.sh says why)
(cd $OUT && tar czf /tmp/next.tgz . ; mv /tmp/next.tgz $OUT/ && find $OUT -mindepth 1 ! -name next.tgz -exec rm -rf {} +)
echo "# total $((SECONDS - t0)) s"
