#!/usr/bin/env bash
# One device call for issue 18's GPU checks: the GPU test suite, then every public call's outputs
# under the tree before the move (7b52f36) and this one, bit for bit (bench/probes/house_identity.py).
# Here, first, the two trees compressed (the carry shares 64 MiB with the ~61 MiB CuTe bundle and
# the tree; ~0.1 MiB each as .tar.xz): the tree before the move, and, since issue 19 changed what
# the layer runs above the skipping range (the routed path), the tree issue 18 landed as "after":
#   git archive 7b52f36 src | xz -9 > .carry/before.tar.xz
#   git archive 562ed73 src | xz -9 > .carry/after.tar.xz
# (plus .carry/cutedsl.tar.xz from ../shared/tools/cutedsl-bundle); then on the GPU machine, with
# carry [".carry"]:  bash bench/house_gpu.sh
set -uo pipefail
source bench/device_env.sh
for t in before after; do  # unpacked here: .carry/before/src, .carry/after/src
  [[ -f .carry/$t.tar.xz && ! -d .carry/$t/src ]] && mkdir -p .carry/$t && tar -xJf .carry/$t.tar.xz -C .carry/$t
done
[[ -z ${NO_SUITE:-} ]] && gpu_suite 360
after=src; [[ -d .carry/after/src ]] && after=.carry/after/src  # issue 18's landing, not HEAD
timeout 200 python3 bench/probes/house_identity.py .carry/before/src $after $OUT 2>&1 | tee $OUT/house_identity.log | tail -12
