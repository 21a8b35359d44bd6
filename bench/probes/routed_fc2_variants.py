"""FC2 (and the combine, as the config runs it) with the table's config against small changes of
it, on the same y, in one process (issue 19: FC2 at large M is latency-bound, Nsight Compute,
docs/routed-journal.md "Fourteenth session"): y's rows through TMA (``fc2_y_tma``) or not, one stage
more, one program an SM more, for a config without the column stream the stream at two group
sizes, and for one with it the unit's y operand in the loop or loaded once before it
(``kern.FC2_HOIST_Y`` switched). Each variant is checked bit for bit against the table's config (every change
here keeps the k-steps and their order) and skipped where ``can_implement`` refuses it.

    python bench/probes/routed_fc2_variants.py [shapes] [M,...] [fp8|bf16]

Timer: CUDA graphs behind an L2 flush, medians."""

import dataclasses

import torch
from _table_y import cases  # (this folder: bench/probes/_table_y.py)

from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import can_implement
from densemoe.ops.routed import _fc2_stage
from densemoe.timing import Timer

timer = Timer(reps=20)
for n, (shape, M, dt, t) in enumerate(cases("2048,4096")):
    if n == 0:
        print(f"# {dt}; us of FC2 + combine as each config runs them, on the table's y", flush=True)
    p, ids, wts, prob, cfg, sp, offs, y, ys, out = t.p, t.ids, t.wts, t.prob, t.cfg, t.sp, t.offs, t.y, t.ys, t.out
    I = p.inter

    def fc2(c):
        _fc2_stage(y, ys, p.w2, p.w2_scale, sp, offs, ids, wts, out, c)
        return out

    want = fc2(cfg).clone()
    pps = cfg.fc2_programs_per_sm or cfg.programs_per_sm
    variants = {"y_tma": dict(fc2_y_tma=not cfg.fc2_y_tma), "stages+1": dict(fc2_stages=cfg.fc2_stages + 1),
                "pps+1": dict(fc2_programs_per_sm=pps + 1),
                "y_tma,stages+1": dict(fc2_y_tma=not cfg.fc2_y_tma, fc2_stages=cfg.fc2_stages + 1)}
    if not cfg.fc2_col_groups and not (cfg.fused_combine or cfg.atomic_combine or cfg.fc2_cute):
        variants["stream g2"] = dict(fc2_col_groups=2)
        variants["stream g8"] = dict(fc2_col_groups=8)
    line = [f"{shape} M={M} table {cfg.short()} {timer(lambda: fc2(cfg))['us']:.1f}"]
    if cfg.fc2_col_groups and I // cfg.fc2_block_k <= 2:  # the stream's y operand in the loop, as before
        kern.FC2_HOIST_Y = not kern.FC2_HOIST_Y
        same = torch.equal(fc2(cfg), want)
        line.append(f"hoist_y={kern.FC2_HOIST_Y} {timer(lambda: fc2(cfg))['us']:.1f}{'' if same else ' WRONG'}")
        kern.FC2_HOIST_Y = not kern.FC2_HOIST_Y
    for name, kw in variants.items():
        if kw.get("fc2_programs_per_sm") is not None:  # 0 means programs_per_sm: one config, one string
            kw["fc2_programs_per_sm"] = 0 if kw["fc2_programs_per_sm"] == cfg.programs_per_sm \
                else kw["fc2_programs_per_sm"]
        try:
            c = dataclasses.replace(cfg, **kw)
        except Exception:
            continue
        ok, why = can_implement(prob, c)
        if not ok:
            line.append(f"{name} -")
            continue
        try:
            same = torch.equal(fc2(c), want)
        except Exception as exc:  # (out of resources on this card): say so, go on
            line.append(f"{name} {type(exc).__name__}")
            continue
        line.append(f"{name} {timer(lambda: fc2(c))['us']:.1f}{'' if same else ' WRONG'}")
    print("  ".join(line), flush=True)
