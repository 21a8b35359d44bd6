"""FC2 and the combine: the pairs' rows summed by the combine launch, against the pairs added into
the token's output row by atomics in FC2's epilogue (issue 19: at DeepSeek-V3 TP8 M = 4096 the
rows cost 2 x 470 MB of traffic, docs/routed.md "The floor of this pipeline"). Forms, each on the
same y, in one process:

- ``table``: the table's config as the routed path runs it;
- ``rows``: the same config on the Triton FC2 (if the table's is the CuTe one), then the combine;
- ``f32``: the library's ``atomic_combine``: an fp32 [M, H] zeroed, FC2's relaxed fp32 adds
  (``red.global.add.v4.f32``), then one cast into out;
- ``bf16``: out itself zeroed, FC2's adds straight into it in bf16 (``red.global.add.noftz.v8.bf16``:
  Triton casts the fp32 value to the pointer's type), no cast; each add rounds to bf16, so the
  error grows with top-k (reported against the table's output, relative to its largest value);
- ``cm`` after a form: FC2's units column tile by column tile (``fc2_col_major``), so that a
  token's k adds of one column tile land close in time (in L2).

The bf16 form is not in the library: this probe measures whether it is worth a config field.

    python bench/probes/routed_combine_atomic.py [shapes] [M,...] [fp8|bf16]

Timer: CUDA graphs behind an L2 flush, medians."""

import dataclasses

from _table_y import cases  # (this folder: bench/probes/_table_y.py)

from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import can_implement
from densemoe.ops.routed import _fc2_stage
from densemoe.timing import Timer

timer = Timer(reps=20)
for n, (shape, M, dt, t) in enumerate(cases("512,2048,4096")):
    if n == 0:
        print(f"# {dt}; us of FC2 + combine in each form, on the table's y; err: max |out - table| / max |table|",
              flush=True)
    p, k, ids, wts, prob, cfg, sp, offs, y, ys, out = (t.p, t.k, t.ids, t.wts, t.prob, t.cfg, t.sp, t.offs, t.y,
                                                      t.ys, t.out)

    def staged(c):
        _fc2_stage(y, ys, p.w2, p.w2_scale, sp, offs, ids, wts, out, c)
        return out

    def bf16_atomic(c):
        out.zero_()
        kern.fc2_launch(y, ys, p.w2, p.w2_scale, sp, offs, wts, out, c.fc1_block_i, c, k)
        return out

    want = staged(cfg).clone().float()
    scale = want.abs().max().item()
    base = dataclasses.replace(cfg, fc2_cute=False, fused_combine=False, atomic_combine=False)
    forms = {"table": (staged, cfg), "rows": (staged, base)}
    for cm in (False, True):
        try:
            a = dataclasses.replace(base, atomic_combine=True, fc2_col_major=cm,
                                    fc2_col_groups=0 if cm else base.fc2_col_groups)
        except Exception as exc:  # a field combination the config refuses: say so, go on
            print(f"# {shape} M={M} col_major={cm}: {exc}", flush=True)
            continue
        tag = " cm" if cm else ""
        forms["f32" + tag] = (staged, a)
        forms["bf16" + tag] = (bf16_atomic, a)
    line = [f"{shape} M={M} {cfg.short()}"]
    for name, (fn, c) in forms.items():
        ok, why = can_implement(prob, c) if c is not cfg else (True, "")
        if not ok:
            line.append(f"{name} -")
            continue
        try:
            err = (fn(c).float() - want).abs().max().item() / scale
        except Exception as exc:  # (out of resources on this card): say so, go on
            line.append(f"{name} {type(exc).__name__}")
            continue
        line.append(f"{name} {timer(lambda: fn(c))['us']:.1f} ({err:.1e})")
    print("  ".join(line), flush=True)
