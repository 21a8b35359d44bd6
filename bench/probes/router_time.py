"""The routers, fused Triton kernel against the torch ops, at the model shapes (Timer: graph
replays, interleaved rounds). Results checked first. python bench/probes/router_time.py"""

import torch

from densemoe import routing as R
from densemoe.timing import Timer

timer = Timer(reps=30)
g = torch.Generator(device="cuda").manual_seed(0)
bias = torch.randn(256, device="cuda", generator=g) * 0.1
cases = {
    "softmax E=128 k=8": lambda x, impl: R.softmax_topk(x[:, :128], 8, renormalize=True, impl=impl),
    "softmax E=256 k=8": lambda x, impl: R.softmax_topk(x, 8, renormalize=True, impl=impl),
    "deepseek E=256 k=8": lambda x, impl: R.deepseek_v3_topk(x, 8, n_group=8, topk_group=4, e_score_correction_bias=bias,
                                                            routed_scaling_factor=2.5, norm_topk_prob=True, impl=impl),
}
for M in (1, 64, 256, 1024):
    x = torch.randn(M, 256, device="cuda", generator=g)
    for name, fn in cases.items():
        a, b = fn(x, "torch"), fn(x, "triton")
        assert (a.alpha - b.alpha).abs().max().item() <= 1e-5, name
        res = timer.compare([lambda: fn(x, "torch"), lambda: fn(x, "triton")])
        print(f"M={M} {name}: torch {res[0]['us']:.1f} us, triton {res[1]['us']:.1f} us", flush=True)
