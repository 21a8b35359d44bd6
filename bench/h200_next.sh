#!/usr/bin/env bash
# Nineteenth session (2026-12-06, H200): END=575 SUITE_TIMEOUT=450 PROBES=atomic_bf16 ATOMIC_TIMEOUT=110
# (66ae31e, 407 s; the suite 366 s on six processes, 958 passed). docs/routed-journal.md "Nineteenth session".
# Eighteenth session (2026-12-06): seven calls refused; the plan stands for the next one, on main with both mailboxes:
# END=575 SUITE_TIMEOUT=450 PROBES=atomic_bf16 ATOMIC_TIMEOUT=110 (the suite's processes now follow the card's memory:
# 4 on an H100, 6 on an H200; SUITE_PROCS overrides). docs/routed-journal.md "Eighteenth session".
# Seventeenth session (2026-12-06, H100): END=470 SUITE_PROCS=4 SUITE_TIMEOUT=300 PROBES="cute_fc2 quant_sched"
# CUTE_FC2_TIMEOUT=100 (dded97e with both mailboxes, 385 s): the suite was cut at 300 s (~83%): give it 420 s or more.
# Next plan: docs/routed-journal.md "Seventeenth session".
# Fifteenth session (2026-12-06, H100): SUITE_PROCS=4 SUITE_TIMEOUT=330 PROBES="fc2_variants quant_rows stages"
# STAGES_SHAPES=deepseek-v3-tp8 STAGES_MS=512,4096 (57efb33, 352 s); SUITE_PROCS=4 SUITE_TIMEOUT=330 PROBES=cute_fc2
# CUTE_FC2_TIMEOUT=130 CUTE_FC2_ARGS="deepseek-v3-tp8,qwen3-30b-a3b 2048,4096" NCU_CUTE_FC2="deepseek-v3-tp8 4096"
# NCU_CUTE_TIMEOUT=110 (2a51365, 297 s; the suite 252 s). Next plan: docs/routed-journal.md "Sixteenth session".
# A session's device call for tests and probes (the next plan: docs/routed-journal.md "Thirteenth session", Next: on
# an H200 the retune comes first, bench/h200_tune_layer.sh; then e.g. NO_SUITE=1 STREAM_SHAPES= PROBES=cute_fc1
# NCU="fc1:...:routed_fc1_sm90:<config>"). The thirteenth session (H100) ran its plan by hand (the commands are
# in docs/routed-journal.md). Last run 2026-12-06, twelfth session, on an H200, tree 2f9a6d4:
# SUITE_PROCS=6 SUITE_TIMEOUT=250 SUITE_PATHS="tests/test_routed_fc1_cute.py tests/test_fc1_cute.py
# tests/test_routed_gpu.py" PROBES="cute_fc1 cute_fc2" STREAM_SHAPES= (215 s); and on an H100, tree 0d43585,
# with SUITE_PROCS=4 PROBES=none (173 s). Before: 2026-12-05,
# tenth session, on an H100, tree a958904 with the patch stack: SUITE_PROCS=5 SUITE_TIMEOUT=390 PROBES=cute_fc1
# CUTE_FC1_TIMEOUT=170 STREAM_SHAPES= (the suite 217 s; five processes ran out of memory: four on an H100);
# before that, eighth session, on an H100, tree 62fdfcd:
# NO_SUITE=1 STREAM_SHAPES= PROBES=position FUZZ=100 FUZZ_K="routed_with or block_fp8" FUZZ_TIMEOUT=250
# NCU="fc1:qwen3-30b-a3b:2048 fc1:qwen3-30b-a3b:16 fc2:qwen3-30b-a3b:16", 250 s; docs/routed.md
# "Eighth session"). Next: PROBES=vs_dense NO_SUITE=1 STREAM_SHAPES= with the sorted-x patch applied
# (docs/routed-journal.md, the eighth session's list). Carry the CuTe bundle (.carry,
# ../shared/tools/cutedsl-bundle) for the CuTe tests (without it they fail, not skip) and call
#
#   bash bench/h200_next.sh <commit>          (run with timeout_s=600; commit: git rev-parse --short HEAD)
#
# (the tree plus the bundle must pass the device's 64 MiB check, which counts stricter than bytes:
# remove bench/results/*.png and bench/results/*.json.gz from the working copy for the call, keep
# bench/results/h200_wip*/, and `git checkout -- .` after; docs/device.md)
#
# 1. the whole GPU suite (-m gpu), ~3.5 min on 8 processes (over 300 s on a cold H100: SUITE_TIMEOUT, default 400);
# 2. (LAYER=1 only: the layer benchmark runs in the second call, bench/h200_tune_layer.sh, after the tuning)
# 3. FC2's column stream against the tuned FC2, alone and in the whole path, where STREAM_SHAPES names
#    shapes (bench/probes/routed_fc2_stream.py, 2 x 75 s at most); the probes PROBES names (default:
#    FC1 on gathered against contiguous rows
#    (routed_fc1_contiguous.py); FC1's loop with one dot over gate and up (fc1_gate_up_one_dot.py);
#    issue 22's one-GPU simulation (sharded_sim.py); PROBES=stages: routed_stages.py), each with a deadline;
# 4. with NCU="fc2:deepseek-v3-tp8:512 ..." (a later call, with NO_SUITE=1): Nsight Compute on one routed
#    launch (bench/probes/routed_ncu.py).
# Everything under $OUT goes back as one tarball (next.tgz; a reply brings at most 8 files). END (default 560):
# the seconds after the start by which the probes stop (for a call with less device time left than 600 s).
# Then, in further calls (each tars $OUT; tar czf $OUT/x.tgz ... as this script does):
#   - block fp8 probes: python3 bench/probes/block_dense_stages.py skip 1,16,64 (the deeper block ring:
#     FC1 was 335 us at TP8 M = 64 against 212 per expert);
#   - Nsight Compute alone: NO_SUITE=1 STREAM_SHAPES= NO_PROBES=1 NCU="fc2:deepseek-v3-tp8:512
#     fc2:deepseek-v3-tp8:2048 fc1:qwen3-30b-a3b:2048" bash bench/h200_next.sh <commit>;
#   - bench/sanitize_gpu.sh <commit> (carry the bundle; TOOLS= to split it over calls; racecheck and
#     synccheck on the fused combine's counters above all; FC1 stream-K's race: patches/README.md);
#   - the routed tuning and layer benchmark of one dtype: DT=fp8|fp8block|bf16 bash bench/h200_tune_layer.sh
#     <commit> (fresh cache; all three ran in the seventh session), merge;
#   - the fuzz suite at scale: NO_SUITE=1 FUZZ=100 FUZZ_TIMEOUT=400 NO_PROBES=1 STREAM_SHAPES= (100 examples a
#     test: 6 of the 8 tests finished in 150 s on an H100; the routed-config and block tests take longer:
#     FUZZ_K="routed_with or block_fp8" runs those two alone);
#   - FC1/FC2 tuning for the dense and skip paths (OPS="fc2 fc1" bash bench/tune_h200.sh).
# On a machine of several GPUs (issue 23; only if status lists one): SUITE_PATHS=tests/test_parallel.py
# gpu_suite 300 (the NCCL test on every GPU), then python3 bench/sharded_gpu.py --out $OUT/sharded_<kind>
# (keep NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 as the machine sets them).
set -uo pipefail
source bench/device_env.sh
commit=${1:-unknown}
t0=$SECONDS
[ -z "${NO_SUITE:-}" ] && { gpu_suite ${SUITE_TIMEOUT:-400}; echo "# suite done at $((SECONDS - t0)) s"; }
if [ -n "${FUZZ:-}" ]; then  # FUZZ=200: the fuzz suite at that many examples a test, failures not shrunk
  left=$((${END:-560} - 20 - (SECONDS - t0)))  # (its report must come back: the sixth session's run was cut before it)
  # SIGINT at the timeout: pytest then prints its summary of what failed so far; each failure is
  # also written to fuzz_failures.txt as it comes (DENSEMOE_FAILURES, tests/conftest.py)
  DENSEMOE_FUZZ_EXAMPLES=$FUZZ DENSEMOE_FUZZ_NO_SHRINK=1 DENSEMOE_FAILURES=$OUT/fuzz_failures.txt \
    timeout -s INT -k 20 $((left < ${FUZZ_TIMEOUT:-240} ? left : ${FUZZ_TIMEOUT:-240})) \
    python3 -m pytest -v -rf --tb=short --maxfail=${FUZZ_MAXFAIL:-4} tests/test_fuzz.py ${FUZZ_K:+-k "$FUZZ_K"} -p no:cacheprovider -n 8 > $OUT/fuzz.log 2>&1
  echo "# fuzz $FUZZ: exit $? at $((SECONDS - t0)) s"; grep -E "(PASSED|FAILED|ERROR) tests/" $OUT/fuzz.log | sed 's/^\[gw[0-9]*\] //' | head -20
  [ -f $OUT/fuzz_failures.txt ] && grep -E "^===|^E  |Falsifying|^ *[a-zA-Z_]+=" $OUT/fuzz_failures.txt | head -40 | cut -c1-300
fi
if [ -n "${LAYER:-}" ]; then  # the layer benchmark (else in the second call, after the tuning: h200_tune_layer.sh)
for shape in deepseek-v3-tp8 qwen3-30b-a3b; do
  out=$OUT/layer_${GPU_TAG}_${shape}_fp8
  timeout ${BENCH_TIMEOUT:-70} python3 -m densemoe.bench layer --shapes $shape --dtypes fp8 \
    --m 1,2,4,8,16,32,64,128,256,512,1024,2048,4096 --reps 20 --skip-max-m 512 --commit "$commit" --out $out > $out.log 2>&1
  echo "# $shape: exit $? at $((SECONDS - t0)) s"
  grep "^experts .* fp8 " $out.log | sed -e 's/^experts //; s/cublas_fp8_pipeline/cublas/; s/hf_grouped_mm_bf16/hf_gmm/' \
    | cut -c1-200
done
fi
# FC2's column stream against the tuned FC2 (docs/routed.md): only where STREAM_SHAPES names shapes
# (e.g. "deepseek-v3-tp8 qwen3-30b-a3b"; it ran unasked before PROBES=stages on 2026-12-06)
for shape in ${STREAM_SHAPES:-}; do
  left=$((${END:-560} - (SECONDS - t0)))  # the tarball below must be written before the call's 600 s
  [ $left -lt 30 ] && { echo "# fc2 stream $shape: skipped, ${left} s left"; continue; }
  ms=$([ $shape = deepseek-v3-tp8 ] && echo 16,128,512,2048,4096 || echo 128,512)
  timeout $((left < ${STREAM_TIMEOUT:-60} ? left : ${STREAM_TIMEOUT:-60})) python3 bench/probes/routed_fc2_stream.py $shape $ms > $OUT/fc2_stream_$shape.log 2>&1
  echo "# fc2 stream $shape: exit $? at $((SECONDS - t0)) s"
  grep -E "^(#|M=)" $OUT/fc2_stream_$shape.log | cut -c1-170
done
budget() { local left=$((${END:-560} - (SECONDS - t0))); echo $((left < $1 ? left : $1)); }
want() { [ -z "${NO_PROBES:-}" ] && [[ " ${PROBES:-contiguous one_dot sim} " == *" $1 "* ]]; }  # PROBES="one_dot": that one alone
left=$(budget 50)  # FC1's gathered rows against contiguous ones (docs/routed-journal.md "Fifth session")
if [ $left -ge 20 ] && want contiguous; then
  timeout $left python3 bench/probes/routed_fc1_contiguous.py qwen3-30b-a3b 128,512,2048,4096 > $OUT/fc1_contiguous.log 2>&1
  echo "# fc1 contiguous: exit $? at $((SECONDS - t0)) s"; grep -v "^ *$" $OUT/fc1_contiguous.log | tail -8 | cut -c1-170
fi
left=$(budget ${ONE_DOT_TIMEOUT:-60})  # FC1's loop: one dot over gate and up against two (docs/routed.md, the floor section)
if [ $left -ge 25 ] && want one_dot; then
  timeout $left python3 bench/probes/fc1_gate_up_one_dot.py ${ONE_DOT_ARGS:-qwen3-30b-a3b 128,256} > $OUT/fc1_one_dot.log 2>&1
  echo "# fc1 one dot: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|rows=|bisect)" $OUT/fc1_one_dot.log | cut -c1-400
fi
left=$(budget ${RAGGED_TIMEOUT:-90})  # RAGGED="qwen3-30b-a3b,deepseek-v3-tp8 2048,4096": the library FC1 on uniform (ragged) routing
if [ $left -ge 25 ] && [ -n "${RAGGED:-}" ]; then
  timeout $left python3 bench/probes/fc1_gate_up_one_dot.py --ragged $RAGGED > $OUT/fc1_ragged.log 2>&1
  echo "# fc1 ragged: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|ragged)" $OUT/fc1_ragged.log | cut -c1-400
fi
left=$(budget 90)  # issue 22: one TP8 and one EP8 rank, the reduction stood in for (docs/parallel.md)
if [ $left -ge 30 ] && want sim; then
  timeout $left python3 bench/sharded_sim.py --out $OUT/sharded_sim_h200 > $OUT/sharded_sim.log 2>&1
  echo "# sharded sim: exit $? at $((SECONDS - t0)) s"; tail -14 $OUT/sharded_sim.log | cut -c1-170
fi
left=$(budget 80)  # PROBES="position": does a timing read slow right after the dense one? (docs/routed-journal.md, seventh session)
if [ $left -ge 30 ] && want position; then
  timeout $left python3 bench/probes/timing_position.py deepseek-v3-tp8 fp8 1024,4096 100,1000 > $OUT/timing_position.log 2>&1
  echo "# timing position: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|M=)" $OUT/timing_position.log | cut -c1-200
fi
left=$(budget ${VS_DENSE_TIMEOUT:-240})  # PROBES="vs_dense": the routed FC1 against the dense FC1 on the same work (eighth session)
if [ $left -ge 30 ] && want vs_dense; then
  timeout $left python3 bench/probes/routed_fc1_vs_dense.py ${VS_DENSE_ARGS:-qwen3-30b-a3b,deepseek-v3-tp8 128,256} > $OUT/fc1_vs_dense.log 2>&1
  echo "# fc1 vs dense: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|vs_dense)|Error" $OUT/fc1_vs_dense.log | cut -c1-600
fi
left=$(budget ${CUTE_FC1_TIMEOUT:-200})  # PROBES="cute_fc1": the CuTe routed FC1 against the Triton one (ninth session;
# the probe comes with patches/issue19-cute-fc1.mbox.gz; carry the CuTe bundle)
if [ $left -ge 30 ] && want cute_fc1 && [ -f bench/probes/routed_fc1_cute.py ]; then
  timeout $left python3 bench/probes/routed_fc1_cute.py ${CUTE_FC1_ARGS:-qwen3-30b-a3b,deepseek-v3-tp8 1024,2048,4096} > $OUT/routed_fc1_cute.log 2>&1
  echo "# cute fc1: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|cute_fc1)|Error" $OUT/routed_fc1_cute.log | cut -c1-900
fi
left=$(budget ${CUTE_FC2_TIMEOUT:-150})  # PROBES="cute_fc2": the CuTe routed FC2 against the Triton one (ninth session)
if [ $left -ge 30 ] && want cute_fc2 && [ -f bench/probes/routed_fc2_cute.py ]; then
  timeout $left python3 bench/probes/routed_fc2_cute.py ${CUTE_FC2_ARGS:-deepseek-v3-tp8,qwen3-30b-a3b 512,2048,4096} > $OUT/routed_fc2_cute.log 2>&1
  echo "# cute fc2: exit $? at $((SECONDS - t0)) s"; grep -E "^(#|cute_fc2)|Error" $OUT/routed_fc2_cute.log | cut -c1-900
fi
left=$(budget 60)  # PROBES="row_tma": one TMA load a row into the swizzled stage (twelfth session, Next 2)
if [ $left -ge 20 ] && want row_tma && [ -f bench/probes/row_tma_gather.py ]; then
  timeout $left python3 bench/probes/row_tma_gather.py > $OUT/row_tma_gather.log 2>&1
  echo "# row tma: exit $? at $((SECONDS - t0)) s"; grep -E "k-tile|gather|Error" $OUT/row_tma_gather.log | head -6
fi
left=$(budget ${VARIANTS_TIMEOUT:-120})  # PROBES="fc2_variants": FC2 with the table's config against small changes
# of it, the y hoist (FC2_HOIST_Y) flipped among them (bench/probes/routed_fc2_variants.py; VARIANTS_ARGS)
if [ $left -ge 30 ] && want fc2_variants; then
  timeout $left python3 bench/probes/routed_fc2_variants.py \
    ${VARIANTS_ARGS:-deepseek-v3-tp8,qwen3-30b-a3b 512,2048,4096 fp8} > $OUT/routed_fc2_variants_${GPU_TAG}.log 2>&1
  echo "# fc2 variants: exit $? at $((SECONDS - t0)) s"
  grep -E "^#|M=|Error" $OUT/routed_fc2_variants_${GPU_TAG}.log | cut -c1-400
fi
# PROBES="quant_rows": x's quantisation in one pass at a block of 8192 (bench/probes/quant_rows_block.py)
left=$(budget 60)
if [ $left -ge 20 ] && want quant_rows; then
  timeout $left python3 bench/probes/quant_rows_block.py > $OUT/quant_rows_${GPU_TAG}.log 2>&1
  echo "# quant rows: exit $? at $((SECONDS - t0)) s"
  grep -E "^#|H=|Error" $OUT/quant_rows_${GPU_TAG}.log | cut -c1-400
fi
# PROBES="quant_sched": x's quantisation in the schedule's launch against the two apart, alone and in the
# whole routed path (bench/probes/quant_schedule.py; the mailbox patches/issue19-quant-schedule.mbox.gz)
left=$(budget 90)
if [ $left -ge 30 ] && want quant_sched && [ -f bench/probes/quant_schedule.py ]; then
  for dt in fp8 fp8block; do
    left=$(budget 45); [ $left -lt 20 ] && { echo "# quant schedule $dt: skipped"; continue; }
    timeout $left python3 bench/probes/quant_schedule.py deepseek-v3-tp8,qwen3-30b-a3b 1,16,128,512,2048,4096 $dt \
      > $OUT/quant_schedule_${GPU_TAG}_$dt.log 2>&1
    echo "# quant schedule $dt: exit $? at $((SECONDS - t0)) s"
    grep -E "^#|M=|Error" $OUT/quant_schedule_${GPU_TAG}_$dt.log | cut -c1-400
  done
fi
left=$(budget ${ATOMIC_TIMEOUT:-100})  # PROBES="atomic_bf16": the combine by atomics in FC2, fp32 and bf16
if [ $left -ge 30 ] && want atomic_bf16; then  # (bench/probes/routed_combine_atomic.py; ATOMIC_ARGS)
  timeout $left python3 bench/probes/routed_combine_atomic.py ${ATOMIC_ARGS:-deepseek-v3-tp8,qwen3-30b-a3b 512,2048,4096} \
    > $OUT/routed_combine_atomic_${GPU_TAG}.log 2>&1
  echo "# combine atomic: exit $? at $((SECONDS - t0)) s"; grep -E "^#|M=|Error" $OUT/routed_combine_atomic_${GPU_TAG}.log | cut -c1-600
fi
left=$(budget 200)  # PROBES="stages": each launch of the routed path alone with the table's config
# (bench/probes/routed_stages.py; STAGES_SHAPES, STAGES_MS, STAGES_DT), beside its traffic bound
if [ $left -ge 30 ] && want stages; then
  for shape in ${STAGES_SHAPES:-deepseek-v3-tp8 qwen3-30b-a3b}; do
    left=$(budget 100); [ $left -lt 30 ] && { echo "# stages $shape: skipped"; continue; }
    timeout $left python3 bench/probes/routed_stages.py $shape ${STAGES_DT:-fp8} ${STAGES_MS:-16,512,2048,4096} \
      > $OUT/routed_stages_${GPU_TAG}_${shape}.log 2>&1
    echo "# stages $shape: exit $? at $((SECONDS - t0)) s"; cut -c1-400 $OUT/routed_stages_${GPU_TAG}_${shape}.log | tail -6
  done
fi
# NCU_CUTE_FC2="deepseek-v3-tp8 4096": Nsight Compute on the CuTe routed FC2's configs of
# bench/probes/routed_fc2_cute.py (its CUTE, in order; --ncu: each launched once, nothing timed)
if [ -n "${NCU_CUTE_FC2:-}" ]; then
  left=$(budget ${NCU_CUTE_TIMEOUT:-120})
  read -r nshape nm <<< "$NCU_CUTE_FC2"
  timeout $left ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    -k regex:routed_fc2_sm90 --launch-count 4 python3 bench/probes/routed_fc2_cute.py $nshape $nm --ncu \
    > $OUT/ncu_cute_fc2_${nshape}_M$nm.txt 2>&1
  echo "# ncu cute fc2: exit $? at $((SECONDS - t0)) s"
  grep -E "routed_fc2_sm90|DRAM Throughput|Duration|Registers Per|Stall|Compute \(SM\)|Issued Warp|No Eligible" \
    $OUT/ncu_cute_fc2_${nshape}_M$nm.txt | cut -c1-150 | head -40
fi
# NCU="fc2:deepseek-v3-tp8:512 fc2:deepseek-v3-tp8:2048 fc1:qwen3-30b-a3b:2048" in a later call (the
# first call's time goes to the above): Nsight Compute on one routed launch (FC1 at Qwen3 M = 2048 runs
# at 28% of the fp8 peak and 3.0x its bound; FC2 at TP8 M = 2048 at 2.2x)
# A spec may add a kernel-name regex and a pinned config: "fc1:qwen3-30b-a3b:2048:routed_fc1_sm90:routed:64,...,1,0,0,0"
# (the CuTe FC1 of a tuned entry: its PTX entry is kernel_cutlass_kernel_densemoekernelscuterouted_fc1_sm90_...;
# the config string, commas and all, after the fourth colon)
for spec in ${NCU:-}; do
  IFS=: read -r kern shape m rx cfg <<< "$spec"
  left=$(budget 60); [ $left -lt 25 ] && { echo "# ncu $spec: skipped"; continue; }
  timeout $left ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    -k regex:"${rx:-_${kern}_kernel}" --launch-skip 2 --launch-count 1 python3 bench/probes/routed_ncu.py $shape $m $cfg \
    > $OUT/ncu_routed_${kern}_${shape}_M$m.txt 2>&1
  echo "# ncu $spec: exit $? at $((SECONDS - t0)) s"
  grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Stall|Compute \(SM\)|L2 Hit|Executed Ipc" \
    $OUT/ncu_routed_${kern}_${shape}_M$m.txt | head -16
done
# the tarball is written outside $OUT, then moved in: written inside, tar warned "file changed as we
# read it" and exited 1, the clean-up behind && did not run, and the reply left next.tgz out (more
# than 8 files; 2026-12-05, fifth session)
(cd $OUT && tar czf /tmp/next.tgz . ; mv /tmp/next.tgz $OUT/ && find $OUT -mindepth 1 ! -name next.tgz -exec rm -rf {} +)
echo "# total $((SECONDS - t0)) s"
