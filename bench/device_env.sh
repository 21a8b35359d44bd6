# Sourced by the device scripts: unpack the carried CuTe DSL bundle and test wheels (.carry/,
# built here by ../shared/tools/cutedsl-bundle and `pip download pytest-xdist execnet`), put the
# tree's src/ first on PYTHONPATH. The device machine has no package index.
if [[ -f .carry/cutedsl.tar.xz ]]; then
  mkdir -p /tmp/site && xz -T16 -dc .carry/cutedsl.tar.xz | tar -x -C /tmp/site
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
fi
if compgen -G ".carry/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl 2>&1 | grep -v WARN | tail -2
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
# the card in result file names (a call that asks for an H200 may run on a held H100: 2026-12-06)
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[12]00' | tr 'H' 'h')
GPU_TAG=${GPU_TAG:-gpu}
python3 -c "import torch, triton, cutlass; print('torch', torch.__version__, 'triton', triton.__version__, 'cutlass-dsl', getattr(cutlass, '__version__', '?'))"
# the GPU test suite, spread over processes when pytest-xdist came along: gpu_suite <timeout_s>
gpu_suite() {
  local par=""
  # processes: SUITE_PROCS, else by the card's memory: 4 on an 80 GB H100 (five ran out of memory there,
  # tenth session), 6 on a 141 GB H200
  local procs=${SUITE_PROCS:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
    | head -1 | awk '{print ($1 > 100000) ? 6 : 4}')}
  python3 -c "import xdist" 2>/dev/null && par="-n ${procs:-4} --dist loadgroup"
  # --durations: the slowest tests go to the log (the reply shows its tail without them)
  timeout ${1:-320} python3 -m pytest -q -m gpu ${SUITE_PATHS:-tests} -p no:cacheprovider --durations=20 $par 2>&1 \
    | tee $OUT/gpu_tests.log | grep -Ev "^[0-9.]+s (call|setup|teardown) " | tail -8
}
