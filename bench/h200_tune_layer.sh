#!/usr/bin/env bash
# The second device call of a session that lands kernel changes (docs/device.md): one dtype's routed and strategy tuning (DT, default fp8) from a fresh cache (every routed schedule in the
# space: the fused combine, FC2's column stream and column-major order, FC1's stream-K), then the
# layer benchmark of that dtype in the same call, reading that cache on top of the shipped tables, so the
# figures are those of the merged table. One tarball comes back (next.tgz: the tuner's wip/,
# its summaries, the benchmark's JSON/markdown/logs). Here, after:
#   tar xzf <files_at>/next.tgz -C /tmp/n && tar xzf /tmp/n/tune.tgz -C /tmp/n/tune (see tune_h200.sh)
#   python bench/merge_tuned.py /tmp/n/tune/wip/tuned.json --into src/densemoe/tuning/tables/h200.json
#
#   bash bench/h200_tune_layer.sh <commit>     (timeout_s=600; carry [".carry"]: the routed space has CuTe
#   candidates (fc1_cute, fc2_cute) at large M since the tenth session; without the bundle they fall back to Triton)
#
# MS_ROUTED (tune_h200.sh's, default every bucket) narrows the tuning to some buckets: after the
# eighth session's space change (FC1's tails, swapped 128-row tiles: only where 64- or 128-row
# tiles are in play) MS_ROUTED=768,1024,1536,2048,3072,4096 retunes what could change, the other
# entries stay valid (their space did not change). The benchmark settles 1000 reads before each
# timing since the eighth session (~30 s more a shape: its timeout is 120 s).
# OPS (default "routed strategy") names the tuning jobs; BENCH_MS (default 1-4096) the benchmark's M. TUNE_BUDGET (default 300 s) bounds the tuning; a cut job resumes from WIP in a later call (WIP: a
# folder of the tree holding an earlier call's wip/ as tune_h200.sh describes; one that does not
# exist is a fresh cache). DT=fp8block or DT=bf16: that dtype's jobs and benchmark instead (the
# seventh session ran all three, one call each: about 280, 360 and 370 s on the H200).
set -uo pipefail
commit=${1:-unknown}
t0=$SECONDS
DT=${DT:-fp8}
BENCH_DT=${BENCH_DT:-$DT}  # the benchmark's one dtype (DT may name several for the tuning)
END=${END:-570}  # the benchmarks stop starting this many seconds after the script began
WIP=${WIP:-bench/results/h200_wip_next} DT=$DT OPS="${OPS:-routed strategy}" BUDGET=${TUNE_BUDGET:-300} bash bench/tune_h200.sh
mkdir -p /tmp/tune && tar xzf $OUT/tune.tgz -C /tmp/tune
source bench/device_env.sh >/dev/null
export DENSEMOE_CACHE_DIR=/tmp/tune/wip
for shape in deepseek-v3-tp8 qwen3-30b-a3b; do
  left=$((END - (SECONDS - t0)))
  [ $left -lt 40 ] && { echo "# layer $shape: skipped, ${left} s left"; continue; }
  out=$OUT/layer_${GPU_TAG}_${shape}_$BENCH_DT
  timeout $((left < 120 ? left : 120)) python3 -m densemoe.bench layer --shapes $shape --dtypes $BENCH_DT \
    --m ${BENCH_MS:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096} --reps 20 --skip-max-m 512 --commit "$commit" --out $out > $out.log 2>&1
  echo "# layer $shape: exit $? at $((SECONDS - t0)) s"
  grep "^experts .* $BENCH_DT " $out.log | sed -e 's/^experts //; s/cublas_fp8_pipeline/cublas/; s/hf_grouped_mm_bf16/hf_gmm/' | cut -c1-200
done
# outside $OUT, then moved in (h200_next.sh says why)
(cd $OUT && tar czf /tmp/next.tgz . ; mv /tmp/next.tgz $OUT/ && find $OUT -mindepth 1 ! -name next.tgz -exec rm -rf {} +)
