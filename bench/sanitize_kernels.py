"""Every kernel of densemoe once per schedule, at small shapes, for compute-sanitizer (issue 21).

    compute-sanitizer --tool memcheck python bench/sanitize_kernels.py     (bench/sanitize_gpu.sh)

What runs (each checked against its fp32 reference after the launch, so a kernel that the
sanitizer passes but that computes garbage still fails here):

- FC2, FC1 and the routed path: for each op, both dtypes (fp8, bf16), M = 1, 7, 100 on a small
  shape, one config of the tuner's space (``tuning.space``) per schedule signature: Triton's
  split / stream-K / swap-AB / TMA or pointer loads / persistent / split-k, CuTe's clusters and
  consumers (where CuTe DSL is installed), the routed path's tile, flatten, atomic- and
  fused-combine, column-stream, column-major and programs-per-SM variants; FC2 and FC1 also with expert skipping (Triton).
- the layer: ``DenseMoE`` (router kernels, the gate's fused quantisation, the y quantisation)
  with each strategy, softmax and DeepSeek-V3 routers, M = 1, 4, 100.
- the schedule in both forms (one program up to 1024 pairs, two launches above); x's fp8
  quantisation in the schedule's launch (the routed op handed x unquantised, per token and, with
  block-scaled weights, in 1 x 128 groups).
- 128 x 128 block-scaled fp8 weights (issue 20) on a shape of 128-multiples: the routed path per
  schedule signature of its space, x handed quantised and x quantised in the schedule, and the
  skip and dense paths (``experts_forward``).

``--limit N`` caps the configs per (op, dtype, M) (default: all signatures); ``--list`` prints
what would run, numbered; ``--from A --to B`` runs launches A <= i < B of that list only (to split
one tool's run over device calls). Each launch prints a line as it ends (``ok <i> <seconds>
<name>``, flushed), so a run cut by a timeout says how far it got, and a sanitizer's report
follows the last ``ok`` line before it. On the CPU (``TRITON_INTERPRET=1``) it runs the Triton
part as a dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

import densemoe
from densemoe.kernels.common import Fc2Problem, RoutedProblem
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.kernels.cute.hopper import cute_available
from densemoe.ops.fc1 import fc1
from densemoe.ops.fc2 import fc2
from densemoe.ops.routed import moe_schedule
from densemoe.ops.routed_configs import can_implement as routed_can_implement
from densemoe.reference import fc1_ref, fc2_ref, moe_schedule_ref
from densemoe.tuning import ops as tops
from densemoe.weights import BLOCK

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if GPU else "cpu"


@dataclasses.dataclass(frozen=True)
class Shape:  # what the tuner's op factories read
    hidden: int
    experts: int
    inter: int
    topk: int


SHAPE = Shape(hidden=256, experts=16, inter=128, topk=4) if GPU else Shape(hidden=64, experts=8, inter=64, topk=2)
# block-scaled fp8 needs H and I in whole 128-blocks (the interpreter's: as few experts as keep it quick)
BLOCK_SHAPE = SHAPE if GPU else Shape(hidden=256, experts=4, inter=128, topk=2)


class Launches:
    """The numbered launches: ``take(name)`` numbers the next launch and gives its number where it
    is in [start, stop) (None else; when listing, it prints it instead); ``done(i, name)`` prints
    its progress line."""

    def __init__(self, start: int = 0, stop: int | None = None, listing: bool = False, match: str = ""):
        self.i, self.start, self.stop, self.listing, self.t0, self.ran = -1, start, stop, listing, time.time(), 0
        self.match = match

    def take(self, name: str) -> int | None:
        self.i += 1
        inside = self.start <= self.i and (self.stop is None or self.i < self.stop) and self.match in name
        if self.listing:
            if inside:
                print(f"{self.i} {name}")
            return None
        return self.i if inside else None

    def done(self, i: int, name: str) -> None:
        self.ran += 1
        print(f"ok {i} {time.time() - self.t0:.1f} {name}", flush=True)


def signature(cfg) -> tuple:
    """What decides a config's schedule (not its tile sizes)."""
    d = dataclasses.asdict(cfg)
    keep = ("split", "swap_ab", "use_tma", "ctas_per_sm", "persistent", "split_k", "stream_k", "cluster_m",
            "cluster_n", "consumers", "flatten", "atomic_combine", "fused_combine", "fc2_col_groups", "fc2_col_major", "tma",
            "programs_per_sm", "fc1_swap_ab", "fc2_swap_ab", "fc1_tail_m", "fc1_sorted_x", "fc2_y_tma", "fc1_cute",
            "fc2_cute", "fc2_block_m", "fc2_programs_per_sm", "fc1_cute_gather")
    return (type(cfg).__name__,) + tuple((k, min(int(d[k]), 2)) for k in keep if k in d)


def variants(cfg, problem):
    """The schedules a small problem's space may leave out, derived from one of its Triton configs
    (FC2: stream-K, split 2, pointer loads, the other orientation; FC1: persistent, split-k,
    stream-K, pointer loads, the other orientation; routed: FC1's tails, FC1 on the sorted copy
    of x, FC2's y through TMA, FC1 and FC2 on tiles of their own, and on a GPU with CuTe both
    GEMMs on the CuTe kernels), each kept where
    ``can_implement`` allows."""
    from densemoe.kernels.triton import fc1 as tfc1, fc2 as tfc2

    if isinstance(cfg, tfc2.Fc2TritonConfig):
        cands, ok = [dict(split=0), dict(split=2), dict(use_tma=False), dict(swap_ab=not cfg.swap_ab)], tfc2.can_implement
    elif isinstance(cfg, tfc1.Fc1TritonConfig):
        cands = [dict(persistent=1), dict(persistent=1, split_k=2), dict(persistent=1, stream_k=1), dict(use_tma=0),
                 dict(swap_ab=1 - cfg.swap_ab)]
        ok = tfc1.can_implement
    elif isinstance(cfg, RoutedConfig):  # FC1's tails: an expert's rest rides on its last whole tile
        cands = [dict(fc1_tail_m=16, block_m=16, flatten=False),  # rests of 1-16 rows
                 dict(fc1_sorted_x=True, fc1_tail_m=0),  # x from its sorted copy (and the copy's kernel)
                 dict(fc2_y_tma=True),  # FC2's y rows through TMA
                 # FC1 and FC2 on tiles of their own (FC1's twice FC2's rows, FC2 at its own programs an SM)
                 dict(block_m=min(2 * cfg.block_m, 128), fc1_tail_m=0, fc1_stages=2, fc2_block_m=cfg.block_m,
                      fc2_programs_per_sm=1 if cfg.programs_per_sm == 2 else 2)]
        if GPU and cute_available():  # both GEMMs on the CuTe kernels (the copy, the tile list, their rings)
            k = cfg.fc1_block_k if problem.dtype == torch.float8_e4m3fn else 64
            cands.append(dict(fc1_cute=True, fc2_cute=True, block_m=64, fc1_block_i=128, fc1_block_k=k, fc1_swap_ab=False,
                              fc1_warps=4, fc1_stages=3, fc1_tail_m=0, fc1_sorted_x=False, fc2_block_n=128,
                              fc2_block_k=k, fc2_swap_ab=False, fc2_warps=4, fc2_stages=3, flatten=False,
                              atomic_combine=False, fused_combine=False, fc2_col_groups=0, fc2_col_major=False,
                              fc2_y_tma=False))
            # the CuTe FC1 gathering x's rows by TMA (its producer's four warps), FC2 on Triton
            cands.append(dict(fc1_cute=True, fc1_cute_gather=True, block_m=64, fc1_block_i=128, fc1_block_k=k,
                              fc1_swap_ab=False, fc1_warps=4, fc1_stages=3, fc1_tail_m=0, fc1_sorted_x=False,
                              fc2_block_k=min(k, cfg.fc2_block_k)))
        ok = routed_can_implement
    else:
        return []
    out = []
    for c in cands:
        v = dataclasses.replace(cfg, **c)
        if ok(problem, v)[0]:
            out.append(v)
    return out


def configs(op, problem, backends, limit):
    seen, out = set(), []
    space = op.space(problem, backends)
    for cfg in space + [v for c in space[:1] for v in variants(c, problem)]:
        s = signature(cfg)
        if s not in seen:
            seen.add(s)
            out.append(cfg)
    return out[:limit] if limit else out


def check(name, got, ref, tol):
    got, ref = got.float(), ref.float()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not torch.isfinite(got).all() or err > tol:
        raise AssertionError(f"{name}: rel err {err:.3e} (> {tol})")


def run_ops(limit, launches: Launches) -> None:

    from densemoe.kernels.triton import fc1 as tfc1, fc2 as tfc2

    backends = ("triton", "cute") if GPU and cute_available() else ("triton",)
    for op in (tops.FC2, tops.FC1, tops.ROUTED):
        for dtype in (FP8, BF16):
            for m in (1, 7, 100):
                p = op.problem(m, SHAPE, dtype, BF16)
                cfgs = configs(op, p, backends, limit)
                inputs = None
                for cfg in cfgs:
                    name = (f"{op.name} {'fp8' if dtype == FP8 else 'bf16'} M={m} {cfg.to_str()}"
                            + (f" {cfg.short()}" if isinstance(cfg, RoutedConfig) else ""))
                    skip_too = isinstance(cfg, (tfc1.Fc1TritonConfig, tfc2.Fc2TritonConfig))
                    i = launches.take(name)
                    i_s = launches.take(name + " skip") if skip_too else None
                    if (i is not None or i_s is not None) and inputs is None:
                        inputs, _ = op.make_inputs(p, DEV, 0, None)
                    if i is not None:
                        out = op.make_out(p, DEV)
                        res = op.run(inputs, out, cfg)
                        got = out if res is None else res
                        check(name, got, op.reference(inputs, cfg), 0.1 if dtype == FP8 else 2e-2)
                        launches.done(i, name)
                    if i_s is not None and run_skip(op, p, inputs, cfg, name):
                        launches.done(i_s, name + " skip")
                if op is tops.ROUTED and dtype == FP8 and cfgs:  # x handed unquantised: quantised in the schedule
                    inputs = run_routed_x_in_schedule(p, cfgs[0], inputs, f"routed fp8 M={m}", launches)


def run_routed_x_in_schedule(p, cfg, inputs, label, launches):
    """The routed op on x unquantised with ``cfg`` (its quantisation in the schedule's launch up
    to ``SMALL_P`` pairs), checked as the quantised call is; gives back the inputs it drew."""
    name = f"{label} {cfg.to_str()} {cfg.short()} x-in-schedule"
    i = launches.take(name)
    if i is None:
        return inputs
    if inputs is None:
        inputs, _ = tops.ROUTED.make_inputs(p, DEV, 0, None)
    bare = inputs._replace(x_quant=None)
    out = tops.ROUTED.make_out(p, DEV)
    res = tops.ROUTED.run(bare, out, cfg)
    check(name, out if res is None else res, tops.ROUTED.reference(bare, cfg), 0.1)
    launches.done(i, name)
    return inputs


def run_block(limit, launches: Launches) -> None:
    """128 x 128 block-scaled fp8: the routed path per schedule signature of its space (x handed
    quantised in 1 x 128 groups; the first config also with x quantised in the schedule), then the
    skip and dense paths through ``experts_forward``, each checked against the math."""
    s = BLOCK_SHAPE
    for m in (1, 7, 100):
        p = RoutedProblem(m, s.hidden, s.experts, s.inter, s.topk, FP8, BF16, BLOCK)
        cfgs = configs(tops.ROUTED, p, ("triton",), limit)
        inputs = None
        for cfg in cfgs:
            name = f"routed fp8block M={m} {cfg.to_str()} {cfg.short()}"
            i = launches.take(name)
            if i is None:
                continue
            if inputs is None:
                inputs, _ = tops.ROUTED.make_inputs(p, DEV, 0, None)
            out = tops.ROUTED.make_out(p, DEV)
            res = tops.ROUTED.run(inputs, out, cfg)
            check(name, out if res is None else res, tops.ROUTED.reference(inputs, cfg), 0.1)
            launches.done(i, name)
        if cfgs:
            inputs = run_routed_x_in_schedule(p, cfgs[0], inputs, f"routed fp8block M={m}", launches)
        for strategy in ("skip", "dense"):
            name = f"experts fp8block {strategy} M={m}"
            i = launches.take(name)
            if i is None:
                continue
            si = tops.strategy_inputs(p, DEV, 0, inputs.prepared if inputs is not None else None)
            check(name, tops.run_strategy(si, strategy), tops.routed_reference(si.routed), 0.1)
            launches.done(i, name)


def run_skip(op, p, inputs, cfg, name) -> bool:
    """The same Triton config with expert skipping (lists built on the GPU); False where the
    config cannot skip."""
    if isinstance(p, Fc2Problem):
        a, w, alpha = inputs
        try:
            got = fc2(a, w, alpha, config=cfg, skip=True, out_dtype=BF16)
        except ValueError:  # a config skipping cannot run (e.g. stream-K): not a skip schedule
            return False
        check(name + " skip", got, fc2_ref(a, w, alpha, torch.float32, compute_dtype=torch.float32), 0.1)
        return True
    x, w1, alpha1, xs = inputs
    g = torch.Generator(device=DEV).manual_seed(1)
    routing = torch.zeros(p.m, p.e, device=DEV)
    routing.scatter_(1, torch.rand(p.m, p.e, generator=g, device=DEV).topk(min(2, p.e), dim=1).indices, 1.0)
    try:
        got = fc1(x, w1, alpha1, x_scale=xs, config=cfg, skip=True, routing=routing, out_dtype=BF16)
    except ValueError:
        return False
    ref = fc1_ref(x, w1, alpha1, x_scale=xs, out_dtype=torch.float32, compute_dtype=torch.float32)
    picked = routing.repeat_interleave(p.i, dim=1) != 0
    check(name + " skip", got.float()[picked], ref[picked], 0.1)
    return True


def run_layer(launches: Launches) -> None:
    s = SHAPE
    g = torch.Generator(device=DEV).manual_seed(2)
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, generator=g, device=DEV) * s.hidden ** -0.5
    w2 = torch.randn(s.experts, s.hidden, s.inter, generator=g, device=DEV) * s.inter ** -0.5
    gate = torch.randn(s.experts, s.hidden, generator=g, device=DEV) * s.hidden ** -0.5
    for dtype in ("fp8", "bf16"):
        pw = densemoe.prepare_weights(w13, w2, dtype=dtype)
        for router in ("softmax", "deepseek_v3"):
            kw = dict(n_group=4, topk_group=2) if router == "deepseek_v3" else {}
            for strategy in ("skip", "dense", "routed"):
                moe = densemoe.DenseMoE(pw, gate, s.topk, router=router, strategy=strategy, **kw)
                for m in (1, 4, 100):
                    name = f"layer {dtype} {router} {strategy} M={m}"
                    x = torch.randn(m, s.hidden, generator=g, device=DEV).to(BF16)  # drawn either way
                    i = launches.take(name)
                    if i is None:
                        continue
                    out = moe(x)
                    if not torch.isfinite(out.float()).all():
                        raise AssertionError(f"{name}: non-finite output")
                    launches.done(i, name)
    for m, k in ((3, 4), (300, 4)):  # the schedule's two forms: <= 1024 pairs and above
        ids = torch.rand(m, s.experts, generator=g, device=DEV).topk(k, dim=1).indices
        name = f"schedule M={m} k={k}"
        i = launches.take(name)
        if i is None:
            continue
        so, oo = moe_schedule(ids, s.experts)
        if not torch.equal(oo.cpu(), moe_schedule_ref(ids.cpu(), s.experts)[1]):
            raise AssertionError(f"schedule M={m}: offsets differ from the twin")
        launches.done(i, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="configs per (op, dtype, M); 0: every schedule signature")
    ap.add_argument("--list", action="store_true", help="print what would run")
    ap.add_argument("--layer-only", action="store_true")
    ap.add_argument("--from", dest="start", type=int, default=0, help="the first launch (of --list's numbers)")
    ap.add_argument("--to", dest="stop", type=int, default=None, help="the launch to stop before")
    ap.add_argument("--match", default="",
                    help="only launches whose name holds this (e.g. 'cute-g-': the gathering CuTe FC1)")
    args = ap.parse_args()
    launches = Launches(args.start, args.stop, args.list, args.match)
    if not args.layer_only:
        run_ops(args.limit, launches)
        run_block(args.limit, launches)
    run_layer(launches)
    if args.list:
        print(f"# {launches.i + 1} launches")
    else:
        print(f"# {launches.ran} launches checked on {DEV} in {time.time() - launches.t0:.0f} s "
              f"(of {launches.i + 1}, from {args.start})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
