"""What the bf16 atomic combine costs in precision, without a GPU (issue 19, nineteenth session).

FC2's epilogue has each pair's fp32 product times its routing weight. Three ways to sum a token's
k of them into the bf16 output, emulated in torch on the CPU in the order each rounds:

- ``rows`` (the library's path): each pair's row rounded to bf16, the k rows summed in fp32,
  one rounding to bf16;
- ``f32``: fp32 adds (the library's ``atomic_combine``), one rounding to bf16;
- ``bf16``: ``red.global.add.bf16`` into the bf16 output, each add an fp32 sum rounded to bf16,
  in an order that varies by token and by call (five orders drawn; the worst reported).

Against the float64 sum: the largest error over the largest value ("max") and the norms' ratio
("rms"), and each bf16 figure over the rows path's. Inputs: products ~ N(0, 1), weights a softmax
of N(0, 1) logits, as a router's top-k give.

    python bench/probes/combine_bf16_rounding.py [M] [H] [k,...]      (default 512 7168 4,8)
"""

import sys

import torch


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = x.double() - ref
    return (d.abs().max() / ref.abs().max()).item(), (d.norm() / ref.norm()).item()


def main(M: int, H: int, ks: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    for k in ks:
        prods = torch.randn(M, k, H, dtype=torch.float64, generator=g)
        w = torch.softmax(torch.randn(M, k, dtype=torch.float64, generator=g), -1)
        contrib = (prods * w[..., None]).float()  # what FC2's epilogue adds, pair by pair
        ref = contrib.double().sum(1)
        rows = errors(contrib.bfloat16().float().sum(1).bfloat16(), ref)
        f32 = errors(contrib.sum(1).bfloat16(), ref)
        worst = (0.0, 0.0)
        for _ in range(5):
            order = torch.argsort(torch.rand(M, k, generator=g), dim=1)
            acc = torch.zeros(M, H, dtype=torch.bfloat16)
            for j in range(k):
                c = contrib.gather(1, order[:, j, None, None].expand(M, 1, H))[:, 0]
                acc = (acc.float() + c).bfloat16()
            e = errors(acc, ref)
            worst = (max(worst[0], e[0]), max(worst[1], e[1]))
        print(f"M={M} H={H} k={k}: max rows {rows[0]:.2e} f32 {f32[0]:.2e} bf16 {worst[0]:.2e} "
              f"({worst[0] / rows[0]:.2f}x rows) | rms rows {rows[1]:.2e} f32 {f32[1]:.2e} bf16 {worst[1]:.2e} "
              f"({worst[1] / rows[1]:.2f}x rows)", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]) if a else 512, int(a[1]) if len(a) > 1 else 7168,
         [int(v) for v in a[2].split(",")] if len(a) > 2 else [4, 8])
