#!/usr/bin/env bash
# One device call for issue 18's GPU checks: the GPU test suite, then every public call's outputs
# under the tree before the move (7b52f36) and this one, bit for bit (bench/probes/house_identity.py).
# Here, first:  mkdir -p .carry/before && git archive 7b52f36 src | tar -x -C .carry/before
# (plus .carry/cutedsl.tar.xz from ../shared/tools/cutedsl-bundle); then on the GPU machine, with
# carry [".carry"]:  bash bench/house_gpu.sh
set -uo pipefail
source bench/device_env.sh
[[ -z ${NO_SUITE:-} ]] && gpu_suite 360
timeout 200 python3 bench/probes/house_identity.py .carry/before/src src $OUT 2>&1 | tee $OUT/house_identity.log | tail -12
