"""Pipeline depth at small M (DeepSeek-V3 TP8 FC2, fp8): the default config with num_stages 3..8."""

import dataclasses

import torch

from densemoe.bench import common, fc2
from densemoe.kernels.common import Fc2Problem
from densemoe.ops.fc2_configs import default_config

timer = common.Timer(reps=50)
ceiling = {"tb_s": common.read_ceiling(timer)["tb_s"]}
peaks = common.peak_tflops(timer)


def space(p: Fc2Problem):
    base = default_config(p)
    return [dataclasses.replace(base, num_stages=s) for s in (3, 4, 5, 6, 7, 8)]


recs = fc2.run(["deepseek-v3-tp8"], ["fp8"], [1, 16, 32], timer, ceiling, peaks, torch.cuda.get_device_name(),
               "stages", configs=space, log=lambda s: print(s.replace("block_", "")[:120], flush=True))
