"""The sharded layer (issue 22) on gloo process groups of 2 and 4 ranks (``torch.multiprocessing``
spawn), the real kernels through Triton's interpreter on small shapes: tensor parallel, expert
parallel and both, against the single-process layer; bad cuts refused by name."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
E, I, H, K = 8, 128, 64, 2  # I = 128: four ranks of TP hold 32 columns each


def _weights(seed=0, dims=(E, I, H, K)):
    e, i, h, _ = dims
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) * h ** -0.5
    w2 = torch.randn(e, h, i, generator=g) * i ** -0.5
    gate = torch.randn(e, h, generator=g) * h ** -0.5
    return w13, w2, gate


def _routing(M, seed, dims=(E, I, H, K), device="cpu"):
    e, _, h, k = dims
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, h, generator=g).to(BF16)
    ids = torch.rand(M, e, generator=g).topk(k, dim=1).indices
    wts = torch.softmax(torch.randn(M, k, generator=g), dim=1)
    return x.to(device), ids.to(device), wts.to(device)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _exact(x, w13, w2, ids, wts):
    x, w13, w2 = x.double(), w13.double().to(x.device), w2.double().to(x.device)
    i = w13.shape[1] // 2
    h = torch.einsum("mh,eih->mei", x, w13)
    y = torch.nn.functional.silu(h[..., :i]) * h[..., i:]
    alpha = torch.zeros(x.shape[0], w13.shape[0], dtype=torch.float64, device=x.device).scatter_(1, ids, wts.double())
    return torch.einsum("me,mei,ehi->mh", alpha, y, w2)


def _same(got, want, x, w13, w2, ids, wts, dtype):
    """bf16: the unsharded output up to the fp32 summation order (one bf16 rounding of the
    output); fp8: as close to the exact math as the unsharded layer (y's groups differ)."""
    if dtype == "bf16":
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -8 * want.float().abs().max().item())
    else:
        ref = _exact(x, w13, w2, ids, wts)
        assert _rel(got, ref) <= 1.25 * _rel(want, ref) + 1e-3, (_rel(got, ref), _rel(want, ref))


def _worker(rank, world, path, layouts, backend="gloo", dims=(E, I, H, K), ms=(1, 7)):
    """Every layout in ``layouts`` on this rank, against the unsharded layer: gloo on the CPU
    through the interpreter, or NCCL with rank r on GPU r."""
    if backend == "gloo":
        os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu"
    else:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank, world_size=world)
    e_all = dims[0]
    try:
        import densemoe
        from densemoe.parallel import shard_weights, sharded_experts

        half = world // 2
        tp_members = [list(range(j, j + 2)) for j in range(0, world, 2)]  # TP pairs {0, 1}, {2, 3}, ...
        ep_members = [list(range(j, world, 2)) for j in range(2)]  # EP over the pairs: {0, 2, ..}, {1, 3, ..}
        groups = {}
        if world >= 4 and world % 2 == 0:  # every rank makes every group, in the same order
            for members in tp_members + ep_members:
                groups[tuple(members)] = dist.new_group(members)
        w13, w2, gate = (t.to(device) for t in _weights(dims=dims))
        for layout in layouts:
            if layout == "tp":
                tp, ep = dist.group.WORLD, None
            elif layout == "ep":
                tp, ep = None, dist.group.WORLD
            else:  # tp (pairs) x ep (world / 2)
                tp = groups[tuple(tp_members[rank // 2])]
                ep = groups[tuple(ep_members[rank % 2])]
                assert half == dist.get_world_size(ep)
            for dtype in ("bf16", "fp8"):
                full = densemoe.prepare_weights(w13, w2, dtype=dtype)
                a, b, sa, sb = shard_weights(w13, w2, tp_group=tp, ep_group=ep)
                mine = densemoe.prepare_weights(a, b, dtype=dtype)
                for strategy in (("skip", "dense", "routed") if dtype == "bf16" else ("dense", "routed")):
                    for M in ms:
                        x, ids, wts = _routing(M, seed=10 * M + len(layout), dims=dims, device=device)
                        want = densemoe.experts_forward(x, full, None, expert_ids=ids, topk_weights=wts, strategy=strategy)
                        got = sharded_experts(x, mine, ids, wts, num_experts=e_all, tp_group=tp, ep_group=ep,
                                              strategy=strategy)
                        _same(got, want, x, w13, w2, ids, wts, dtype)
                        if M > 1:  # FC2 in 3 column pieces, each summed while the next runs: the same sums
                            got3 = sharded_experts(x, mine, ids, wts, num_experts=e_all, tp_group=tp, ep_group=ep,
                                                   strategy=strategy, pieces=3)
                            if backend == "gloo":
                                assert torch.equal(got3, got), (layout, dtype, strategy)
                            else:  # FC2's own order of sums may differ with its N
                                _same(got3, want, x, w13, w2, ids, wts, dtype)
                m9 = 9
                x, ids, wts = _routing(m9, seed=3, dims=dims, device=device)
                want = densemoe.experts_forward(x, full, None, expert_ids=ids, topk_weights=wts, strategy="routed")
                if tp is not None:  # the tokens' sum scattered: this rank's rows of the tp group
                    n, r = dist.get_world_size(tp), dist.get_rank(tp)
                    rows = -(-m9 // n)
                    got = sharded_experts(x, mine, ids, wts, num_experts=e_all, tp_group=tp, ep_group=ep,
                                          strategy="routed", reduce="reduce_scatter")
                    part = want[r * rows:(r + 1) * rows]
                    assert got.shape == part.shape, (got.shape, part.shape)
                    got2 = sharded_experts(x, mine, ids, wts, num_experts=e_all, tp_group=tp, ep_group=ep,
                                           strategy="routed", reduce="reduce_scatter", pieces=2)
                    if backend == "gloo":
                        assert torch.equal(got2, got)
                    sl = slice(r * rows, (r + 1) * rows)
                    for g in (got, got2):
                        _same(g, part, x[sl], w13, w2, ids[sl], wts[sl], dtype)
            # the whole layer: DenseMoE with its router, as the unsharded one
            whole = densemoe.DenseMoE(densemoe.prepare_weights(w13, w2, dtype="bf16"), gate, dims[3])
            a, b, _, _ = shard_weights(w13, w2, tp_group=tp, ep_group=ep)
            part = densemoe.DenseMoE(densemoe.prepare_weights(a, b, dtype="bf16"), gate, dims[3], tp_group=tp,
                                     ep_group=ep)
            x, ids, wts = _routing(6, seed=5, dims=dims, device=device)
            for pieces in (1, 2):
                part.reduce_pieces = pieces
                torch.testing.assert_close(part(x).float(), whole(x).float(), rtol=2 ** -7,
                                           atol=2 ** -8 * whole(x).float().abs().max().item())
    finally:
        dist.destroy_process_group()


def _spawn(world, layouts, deadline_s=600, **kw):
    """Run the workers; a worker's exception fails the test, and a hang (a collective some rank
    never joins) is killed after ``deadline_s`` instead of holding CI."""
    import time

    with tempfile.TemporaryDirectory() as d:
        args = (world, os.path.join(d, "rdzv"), layouts, kw.get("backend", "gloo"), kw.get("dims", (E, I, H, K)),
                kw.get("ms", (1, 7)))
        ctx = mp.spawn(_worker, args=args, nprocs=world, join=False)
        end = time.monotonic() + deadline_s
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} ranks did not finish within {deadline_s} s")


@pytest.mark.interpreter
def test_tp_and_ep_on_two_ranks():
    _spawn(2, ("tp", "ep"))


@pytest.mark.interpreter
def test_tp_by_ep_on_four_ranks():
    _spawn(4, ("tp_ep",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs 2 or more CUDA GPUs (NCCL) and TRITON_INTERPRET unset")
def test_sharded_layer_on_every_gpu_with_nccl():
    """Issue 23's suite part: the sharded layer over NCCL on every GPU of the machine (rank r on
    GPU r), tensor parallel, expert parallel and, from 4 GPUs, both; E = 16, I = 256 so that 8
    ranks still hold 32 columns or 2 experts each; ragged M up to 1000."""
    world = torch.cuda.device_count()
    layouts = ("tp", "ep") + (("tp_ep",) if world >= 4 and world % 2 == 0 else ())
    _spawn(world, layouts, deadline_s=900, backend="nccl", dims=(16, 256, 256, 4), ms=(1, 7, 100, 1000))


def test_bad_cuts_are_refused_by_name():
    from densemoe.parallel import Shard, shard_weights

    w13, w2, _ = _weights()
    with pytest.raises(ValueError, match=r"E = 8 experts cannot be cut over ep_group's 3 ranks"):
        shard_weights(w13, w2, shard=Shard(ep_rank=0, ep_size=3))
    with pytest.raises(ValueError, match=r"I = 128 cannot be cut over tp_group's 3 ranks"):
        shard_weights(w13, w2, shard=Shard(tp_rank=0, tp_size=3))
    with pytest.raises(ValueError, match=r"I / tp = 128 / 8 = 16 per rank is not a multiple of 32"):
        shard_weights(w13, w2, shard=Shard(tp_rank=0, tp_size=8))
    with pytest.raises(ValueError, match=r"torch.distributed is not initialised"):
        Shard.of(tp_group=object())


def test_shard_weights_cuts_gate_up_and_down_alike():
    """Rank (t, p)'s share: experts [p E/ep, (p+1) E/ep), of each the gate rows, up rows and w2
    columns [t I/tp, (t+1) I/tp); per-expert and block scales cut with them."""
    from densemoe.parallel import Shard, shard_weights

    w13, w2, _ = _weights()
    s = torch.rand(E) + 0.5
    a, b, sa, sb = shard_weights(w13, w2, w13_scale=s, w2_scale=s, shard=Shard(tp_rank=1, tp_size=2, ep_rank=1, ep_size=2))
    assert torch.equal(a, torch.cat([w13[4:, 64:128], w13[4:, 192:256]], dim=1))
    assert torch.equal(b, w2[4:, :, 64:128]) and torch.equal(sa, s[4:]) and torch.equal(sb, s[4:])
    # 128 x 128 block scales: I = 256 cut in two keeps one column of blocks each
    w13b, w2b = torch.randn(2, 512, 128).to(FP8), torch.randn(2, 128, 256).to(FP8)
    s13, s2 = torch.rand(2, 4, 1), torch.rand(2, 1, 2)
    a, b, sa, sb = shard_weights(w13b, w2b, w13_scale=s13, w2_scale=s2, shard=Shard(tp_rank=1, tp_size=2))
    assert a.shape == (2, 256, 128) and torch.equal(sa, s13[:, [1, 3]]) and torch.equal(sb, s2[:, :, 1:2])


@pytest.mark.interpreter
def test_simulated_ranks_add_up_to_the_layer():
    """``shard=`` (no collective): the partial outputs of every simulated rank of TP2 x EP2 add up
    to the unsharded layer (bf16, fp32 sums)."""
    import densemoe
    from densemoe.parallel import Shard, shard_weights, sharded_experts

    w13, w2, _ = _weights()
    x, ids, wts = _routing(7, seed=2)
    full = densemoe.prepare_weights(w13, w2, dtype="bf16")
    for strategy in ("dense", "routed"):
        want = densemoe.experts_forward(x, full, None, expert_ids=ids, topk_weights=wts, strategy=strategy)
        total = torch.zeros(7, H)
        for t in range(2):
            for p in range(2):
                s = Shard(tp_rank=t, tp_size=2, ep_rank=p, ep_size=2)
                a, b, _, _ = shard_weights(w13, w2, shard=s)
                total += sharded_experts(x.float(), densemoe.prepare_weights(a, b, dtype="bf16"), ids, wts,
                                         num_experts=E, strategy=strategy, shard=s)
        torch.testing.assert_close(total.to(BF16).float(), want.float(), rtol=2 ** -7,
                                   atol=2 ** -8 * want.float().abs().max().item())
    # EP over 8 ranks of one expert each: a token's k = 2 picks exceed a rank's experts
    ids8 = ids.clone()
    for strategy in ("dense", "routed"):
        want = densemoe.experts_forward(x, full, None, expert_ids=ids8, topk_weights=wts, strategy=strategy)
        total = torch.zeros(7, H)
        for p in range(8):
            s = Shard(ep_rank=p, ep_size=8)
            a, b, _, _ = shard_weights(w13, w2, shard=s)
            total += sharded_experts(x.float(), densemoe.prepare_weights(a, b, dtype="bf16"), ids8, wts,
                                     num_experts=E, strategy=strategy, shard=s)
        torch.testing.assert_close(total.to(BF16).float(), want.float(), rtol=2 ** -7,
                                   atol=2 ** -8 * want.float().abs().max().item())
    with pytest.raises(ValueError, match="not both"):
        sharded_experts(x, full, ids, wts, num_experts=E, shard=Shard(), tp_group=object())



def test_column_pieces_cut_evenly_and_refuse_bad_counts():
    from densemoe.parallel import cuts

    assert cuts(64, 1) == [(0, 64)]
    assert cuts(64, 3) == [(0, 21), (21, 42), (42, 64)]
    assert cuts(7168, 4, 128) == [(0, 1792), (1792, 3584), (3584, 5376), (5376, 7168)]
    assert cuts(7168, 3, 128) == [(0, 2304), (2304, 4736), (4736, 7168)]  # 18, 19, 19 scale blocks
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sharded_experts: pieces must be a positive int"):
            cuts(64, bad)
    with pytest.raises(ValueError, match=r"pieces=3 is more than the 2 column pieces of 128 that H = 256 holds"):
        cuts(256, 3, 128)


class _Recorded:
    """A stand-in collective that records what it was handed and when it was waited for."""

    def __init__(self, log):
        self.log = log

    def __call__(self, buf):
        self.log.append(("issue", tuple(buf.shape)))
        return self

    def wait(self):
        self.log.append(("wait",))


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["dense", "routed"])
def test_a_simulated_rank_issues_each_piece_before_the_next_fc2(strategy):
    """One rank with no collective (shard=): pieces give the partial of one piece, the stand-in
    reduction sees each piece as its FC2 is issued, and the waits come after the last one."""
    import densemoe
    from densemoe.parallel import Shard, shard_weights, sharded_experts

    w13, w2, _ = _weights()
    shard = Shard(tp_rank=1, tp_size=2)
    a, b, _, _ = shard_weights(w13, w2, shard=shard)
    mine = densemoe.prepare_weights(a, b, dtype="bf16")
    x, ids, wts = _routing(7, seed=2)
    one = sharded_experts(x, mine, ids, wts, num_experts=E, shard=shard, strategy=strategy)
    log = []
    four = sharded_experts(x, mine, ids, wts, num_experts=E, shard=shard, strategy=strategy, pieces=4,
                           simulate_reduce=_Recorded(log))
    assert torch.equal(four, one)
    assert log == [("issue", (7, 16))] * 4 + [("wait",)] * 4
    with pytest.raises(ValueError, match="simulate_reduce stands in for the collective of a simulated rank"):
        sharded_experts(x, mine, ids, wts, num_experts=E, strategy=strategy, simulate_reduce=_Recorded([]))
    with pytest.raises(ValueError, match=r"DenseMoE: reduce_pieces=65 is more than the 64 column pieces"):
        densemoe.DenseMoE(mine, torch.randn(E, H), K, reduce_pieces=65)


@pytest.mark.interpreter
@pytest.mark.parametrize("script", ["sharded_sim.py", "sharded_gpu.py"])
def test_the_sharded_benchmarks_check_themselves_on_the_cpu(script):
    """The GPU benchmarks of issues 22 and 23 run their checks on tiny shapes through the
    interpreter (sharded_gpu.py on 2 gloo ranks), so a device call does not find their bugs."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(root / "bench" / script), "--check"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "M=7" in r.stdout
