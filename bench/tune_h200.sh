#!/usr/bin/env bash
# The H200 tables (issue 19, item 3): FC2, FC1, the routed path's tiles and the strategy
# crossovers for DeepSeek-V3 TP8 and Qwen3-30B-A3B, fp8 and bf16. Run so far (2026-12-05): the
# routed and strategy jobs, fp8, bf16 and fp8block, all 19 buckets (one call of 413 s from a cache
# that held the fp8 routed entries: routed 30-55 s a job, strategy 15-36 s). Not run: fc1, fc2.
# Resumable: one device call works through the jobs below in order until BUDGET seconds of the
# call are spent, skipping the jobs (and, inside a job, the M buckets) that earlier calls
# finished; call it again until it prints "ALL DONE".
#
#   carry [".carry"] (the CuTe DSL bundle, for FC2's CuTe candidates: ../shared/tools/cutedsl-bundle)
#   bash bench/tune_h200.sh                 # the next jobs; run with timeout_s=600
#   DT=fp8 bash bench/tune_h200.sh          # only these dtypes' jobs; OPS="routed strategy" likewise
#   (DT fp8block: 128 x 128 block-scaled weights, issue 20; its routed and strategy jobs only)
#
# Between calls, here (not on the device): unpack the one file the call brings back
# (tar xzf <files_at>/tune.tgz -C /tmp/tune) and keep its wip/,
#   mkdir -p bench/results/h200_wip && cp /tmp/tune/wip/done.txt bench/results/h200_wip/ &&
#   gzip -9 -c /tmp/tune/wip/tuned.json > bench/results/h200_wip/tuned.json.gz   (committed, gzipped: the
#   next session resumes from it; done.txt lists finished jobs, emptied where a job ran with fewer
#   buckets than MS_ROUTED)
# a folder that the next call's copy of the tree carries; the script seeds its cache
# (tuned.json) and its list of finished jobs (done.txt) from it. At the end:
#   python bench/merge_tuned.py bench/results/h200_wip/tuned.json.gz --into src/densemoe/tuning/tables/h200.json
# and commit the summaries (<files_at>/tune_<h100 or h200>_*.md) under bench/results/. Merge into the table of
# the card that ran (device.txt; the keys name it): a call for an H200 may run on a held H100.
#
# Jobs, per dtype (fp8 first), each `python -m densemoe tune --missing-only`:
#   routed   TP8, Qwen3   M 1..4096 (19 buckets: the sweep, 768, 1024, 1536, 2048, 3072, 4096)
#   fc2      TP8, Qwen3   M 1..512 (13 buckets), Triton and CuTe
#   fc1      TP8, Qwen3   M 1..512, Triton (no shipped H100 FC1 entry names CuTe: docs/tuning.md)
#   strategy TP8, Qwen3   M 1..4096, after the three ops of its dtype: each strategy runs with the
#                         configs the cache then holds (the routed source is in each entry)
# FC1 and FC2 stop at M = 512 (MS_DENSE to change it): past it the dense path does E / top-k =
# 32x (TP8) or 16x (Qwen3) the routed FLOPs and was 2.3-7x slower than vLLM at M = 512-4096
# (issue 19's table); tuning it there would take device time and change no pick.
#
# Time, estimated (the routed line measured since), per (shape, dtype):
#   fc2      100-230 s: the H100 host's measured FC2 sweeps (16 cores, docs/tuning.md), mostly
#            compiling: 190-243 Triton kernels in 8 processes, 80-134 CuTe kernels in-process;
#   fc1      ~60 s: 83 Triton kernels in 8 processes (~25 s), 13 buckets x ~55 timings x ~25 ms;
#   routed   ~100 s: <= 80 configs = ~100 Triton kernels in 8 processes (~35 s), 19 buckets x <= 60
#            timings (<= 49 candidates + finals) x 20-60 ms (a timing: ~6 ms of flush reads, 24
#            runs), references and inputs ~10 s;
#   strategy ~60 s: 19 buckets x 3 rounds x 3 strategies, dominated by the untimed first calls
#            (compiles per new M) and the dense / skip calls at M >= 1024 (TP8 fp8 M = 4096:
#            ~9.6 ms a call, x 24 runs x 3 rounds x 2 strategies = 1.4 s);
#   plus ~15 s of Python start per job. fp8: ~2 x 450 + 8 x 15 = ~1000 s; bf16 ~10% more (its
#   compute-bound calls take longer): ~35 min in all, four calls of BUDGET = 540 s (the rest of
#   the 600 s: the set-up, ~30 s, and the margin for `timeout`). The first two calls finish fp8
#   (tables and crossovers). A job cut by the budget keeps every bucket it finished (each is
#   recorded as it is done) and the next call resumes at the next bucket.
set -uo pipefail
source bench/device_env.sh
BUDGET=${BUDGET:-540}
MIN_LEFT=${MIN_LEFT:-45}  # do not start a job with less than this left
MS_ROUTED=${MS_ROUTED:-1-512,768,1024,1536,2048,3072,4096}
MS_DENSE=${MS_DENSE:-1-512}
WIP=${WIP:-bench/results/h200_wip}
export DENSEMOE_CACHE_DIR=$OUT/wip
mkdir -p $DENSEMOE_CACHE_DIR
[[ -f $WIP/tuned.json.gz ]] && gunzip -c $WIP/tuned.json.gz > $DENSEMOE_CACHE_DIR/tuned.json
touch $DENSEMOE_CACHE_DIR/done.txt
[[ -f $WIP/done.txt ]] && cp $WIP/done.txt $DENSEMOE_CACHE_DIR/done.txt
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader | tee $OUT/device.txt

# smoke: one routed call per dtype against the reference (the routed kernels had never run on a
# GPU when this was written); if it fails, the routed jobs are skipped instead of failing every
# candidate of every bucket, and the crossovers run without "routed"
ROUTED_OK=$(timeout 120 python3 - 2>$OUT/routed_smoke.log <<'EOF'
import sys
import torch
from densemoe.kernels.common import RoutedProblem
from densemoe.tuning.ops import ROUTED, make_routed_inputs, routed_reference
from densemoe.ops.routed_configs import default_config
ok = []
for dt in (torch.float8_e4m3fn, torch.bfloat16):
    for m in (1, 4096):  # the default's swapped 16-row tiles, and its 128-row ones
        p = RoutedProblem(m, 7168, 256, 256, 8, dt, torch.bfloat16)
        inputs = make_routed_inputs(p, "cuda", seed=m)
        cfg = default_config(p)
        out = ROUTED.run(inputs, None, cfg)
        ref = routed_reference(inputs, cfg)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"routed smoke {dt} M={m} {cfg.short()}: relative error {err:.2e}", file=sys.stderr)
        ok.append(err < 1e-2)
print(1 if all(ok) else 0)
EOF
)
cat $OUT/routed_smoke.log | tail -6
[[ $ROUTED_OK == 1 ]] || echo "ROUTED SMOKE FAILED: routed jobs skipped (see routed_smoke.log)"

jobs=()
for dt in ${DT:-fp8 bf16 fp8block}; do
  for op in ${OPS:-routed fc2 fc1 strategy}; do
    [[ $dt == fp8block && ( $op == fc1 || $op == fc2 ) ]] && continue  # block weights: routed, strategy
    for shape in deepseek-v3-tp8 qwen3-30b-a3b; do jobs+=("$op $shape $dt"); done
  done
done
left=0
for job in "${jobs[@]}"; do
  read -r op shape dt <<< "$job"
  grep -qx "$job" $DENSEMOE_CACHE_DIR/done.txt && continue
  [[ $op == routed && $ROUTED_OK != 1 ]] && { echo "skip: $job (routed smoke failed)"; left=$((left + 1)); continue; }
  remaining=$((BUDGET - SECONDS))
  if (( remaining < MIN_LEFT )); then left=$((left + 1)); continue; fi
  ms=$MS_DENSE; backends=triton,cute
  [[ $op == routed || $op == strategy ]] && ms=$MS_ROUTED
  [[ $op == fc1 || $op == routed ]] && backends=triton
  tag=${op}_${shape}_${dt}
  t0=$SECONDS
  timeout -k 10 $remaining python3 -m densemoe tune --op $op --shape $shape --m $ms --dtypes $dt \
    --backends $backends --missing-only --out $OUT/tune_${GPU_TAG}_$tag.md 2> $OUT/tune_${GPU_TAG}_$tag.log
  rc=$?
  echo "== $job: rc $rc in $((SECONDS - t0)) s; $(grep -ac dropped $OUT/tune_${GPU_TAG}_$tag.log) dropped"
  grep -a "precompiled" $OUT/tune_${GPU_TAG}_$tag.log | tail -2
  grep -av "dropped\|\[#\|\[\.\|Warning\|warn" $OUT/tune_${GPU_TAG}_$tag.log | tail -3
  cut -c1-220 $OUT/tune_${GPU_TAG}_$tag.md 2>/dev/null
  if (( rc == 0 )); then echo "$job" >> $DENSEMOE_CACHE_DIR/done.txt; else left=$((left + 1)); fi
done
python3 - "$DENSEMOE_CACHE_DIR/tuned.json" <<'EOF'
import collections, json, os, sys
path = sys.argv[1]
entries = json.load(open(path))["entries"] if os.path.exists(path) else {}
count = collections.Counter(tuple(k.split("|")[i] for i in (0, 2)) for k in entries)
print("entries:", ", ".join(f"{op} {dt}: {n}" for (op, dt), n in sorted(count.items())) or "none")
EOF
rm -f $DENSEMOE_CACHE_DIR/tuned.json.lock
if (( left == 0 )); then echo "ALL DONE"; else echo "$left jobs left: call again (after copying wip/ to $WIP)"; fi
# one file comes back: a reply brings at most 8 (2026-12-05: a call's wip/tuned.json was left
# behind that way and its jobs ran again); here: tar xzf <files_at>/tune.tgz -C <dir>
(cd $OUT && tar czf /tmp/tune.tgz . ; mv /tmp/tune.tgz $OUT/ && find $OUT -mindepth 1 ! -name tune.tgz -exec rm -rf {} +)  # outside $OUT first (h200_next.sh)
