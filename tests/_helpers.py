"""Shared test helpers: input generation, the plain-PyTorch per-expert loop, the error check."""

from __future__ import annotations

import contextlib
import zlib

import torch

FP8 = torch.float8_e4m3fn
IN_DTYPES = (FP8, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

ALPHA_KINDS = ("sparse", "dense", "zero_col", "zero_row")


def dtype_id(dt: torch.dtype) -> str:
    return {FP8: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dt, str(dt))


def seed_of(*parts) -> int:
    """A stable seed from any reprs (e.g. a test's node id): reproducible, distinct per test."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_alpha(M: int, E: int, gen: torch.Generator, alpha_kind: str = "sparse") -> torch.Tensor:
    """[M, E] float32 routing scales.

    sparse:   randn with about half of each row zeroed (E // 2 entries per row, random
              positions; never a whole row), at least one negative entry.
    dense:    randn, no zeros forced.
    zero_col: sparse, plus one whole expert column (E // 2) zeroed.
    zero_row: sparse, plus one whole token row (M // 2) zeroed.
    """
    if alpha_kind not in ALPHA_KINDS:
        raise ValueError(f"alpha_kind must be one of {ALPHA_KINDS}, got {alpha_kind!r}")
    alpha = torch.randn(M, E, generator=gen, dtype=torch.float32)
    if alpha_kind != "dense" and E >= 2:
        order = torch.rand(M, E, generator=gen).argsort(dim=1)
        alpha.scatter_(1, order[:, : E // 2], 0.0)
    if alpha.numel() and not (alpha < 0).any():
        nz = alpha.nonzero()
        if len(nz):
            alpha[nz[0, 0], nz[0, 1]] *= -1
    if alpha_kind == "zero_col" and M:
        alpha[:, E // 2] = 0.0
    if alpha_kind == "zero_row" and M:
        alpha[M // 2, :] = 0.0
    return alpha


def make_inputs(M: int, N: int, E: int, I: int, dtype: torch.dtype, seed: int,
                alpha_kind: str = "sparse"):
    """Fresh random (a [M, E*I], w [N, E*I], alpha [M, E]) on the CPU; never all zeros.

    a = randn cast to ``dtype``; w = randn * 0.5 cast to ``dtype``; alpha see ``make_alpha``.
    """
    gen = torch.Generator().manual_seed(seed)
    K = E * I
    a = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) * 0.5).to(dtype)
    alpha = make_alpha(M, E, gen, alpha_kind)
    return a, w, alpha


def torch_loop(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-expert loop in plain PyTorch, independent of ``densemoe.reference``:

        out = sum_e alpha[:, e:e+1] * (a_e @ w_e.T), each product, scale and sum in
        ``compute_dtype`` (upcast inputs), cast to ``out_dtype`` once.

    With compute_dtype=float32 this is "what PyTorch gets at the kernel's precision".
    """
    M, K = a.shape
    E = alpha.shape[1]
    I = K // E
    acc = torch.zeros(M, w.shape[0], dtype=compute_dtype)
    a_c, w_c, al_c = a.to(compute_dtype), w.to(compute_dtype), alpha.to(compute_dtype)
    for e in range(E):
        part = a_c[:, e * I:(e + 1) * I] @ w_c[:, e * I:(e + 1) * I].T
        acc = acc + al_c[:, e:e + 1] * part
    return acc.to(out_dtype)


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error) of x against ref, in float64."""
    d = x.double() - ref.double()
    ref_norm = ref.double().norm().item()
    fro = d.norm().item()
    rel = fro / ref_norm if ref_norm > 0 else fro
    mx = d.abs().max().item() if d.numel() else 0.0
    return rel, mx


def assert_close_to_torch(out: torch.Tensor, ref: torch.Tensor, torch_same_precision: torch.Tensor):
    """Our result must be about as accurate as PyTorch at the same precision.

    ref: the float64 reference; torch_same_precision: ``torch_loop`` in float32 cast to the
    out dtype. Requires no NaN/inf, rel Frobenius error <= 1.5 * torch's + 2**-20 and max-abs
    error <= 2 * torch's + 2**-20 * max|ref|.
    """
    assert out.shape == ref.shape == torch_same_precision.shape, (out.shape, ref.shape,
                                                                  torch_same_precision.shape)
    assert out.dtype == torch_same_precision.dtype, (out.dtype, torch_same_precision.dtype)
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} NaNs in the output"
    assert torch.isfinite(out).all(), "non-finite values in the output"
    rel, mx = errors(out, ref)
    t_rel, t_mx = errors(torch_same_precision, ref)
    ref_max = ref.double().abs().max().item() if ref.numel() else 0.0
    rel_bound = 1.5 * t_rel + 2.0 ** -20
    mx_bound = 2.0 * t_mx + 2.0 ** -20 * ref_max
    assert rel <= rel_bound, (f"relative Frobenius error {rel:.3e} > {rel_bound:.3e} "
                              f"(torch at the same precision: {t_rel:.3e})")
    assert mx <= mx_bound, (f"max abs error {mx:.3e} > {mx_bound:.3e} "
                            f"(torch at the same precision: {t_mx:.3e}, max|ref| {ref_max:.3e})")


@contextlib.contextmanager
def cute_dump_dir(path):
    """Make CuTe DSL write this process's compile artifacts (the PTX that CUTE_DSL_KEEP keeps)
    into ``path`` while the block runs. tests/conftest.py sets one CUTE_DSL_DUMP_DIR before
    pytest-xdist starts its workers, so every worker inherits the same directory, and the file
    name does not depend on the config: two workers compiling at once would read each other's
    PTX. A directory per test avoids that."""
    from cutlass.cutlass_dsl import CuTeDSL

    env = CuTeDSL._get_dsl().envar
    old = env.dump_dir
    env.dump_dir = str(path)
    try:
        yield str(path)
    finally:
        env.dump_dir = old


def fake_timer(fn, **kw):
    """A benchmark timer for CPU tests: runs ``fn`` once, reports 10 us."""
    fn()
    return {"us": 10.0, "us_min": 9.0, "us_p90": 11.0}


class OrderTimer:
    """A timer whose ``compare`` gives callable i of a call the time 10 * (i + 1) us, so the
    records show which timing went where."""

    def __call__(self, fn, **kw):
        fn()
        return {"us": 1.0, "us_min": 1.0, "us_p90": 1.0}

    def in_graph(self, fn, **kw):  # (Timer.in_graph): always 7 us
        fn()
        return {"us": 7.0, "flush_us": 100.0}

    def compare(self, fns, **kw):
        for fn in fns:
            fn()
        return [{"us": 10.0 * (i + 1), "us_min": 0.0, "us_p90": 0.0, "us_rounds": [10.0 * (i + 1)] * 3}
                for i in range(len(fns))]


def gpu_big_test(fn):
    """GPU tests on model-shape weights (GBs): marked ``gpu``, kept in one pytest-xdist worker
    (group ``gpu_big``), skipped without a GPU or under Triton's interpreter."""
    import os

    import pytest

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for mark in (pytest.mark.gpu, pytest.mark.xdist_group("gpu_big"),
                 pytest.mark.skipif(interpret or not torch.cuda.is_available(),
                                    reason="needs a CUDA GPU and TRITON_INTERPRET unset")):
        fn = mark(fn)
    return fn


# ---------------------------------------------------------------- block-scaled fp8 (issue 20)

BLOCK = 128
BF16 = torch.bfloat16


def block_weights(E, I, H, seed=0):
    """fp8 experts with one scale per 128 x 128 block, the scales spread over 20x as in
    checkpoints; also the float32 weights they stand for."""
    g = torch.Generator().manual_seed(seed)

    def one(rows, cols, fan_in):
        s = (torch.rand(E, rows // BLOCK, cols // BLOCK, generator=g) * 19 + 1) * (fan_in ** -0.5 / 448)
        q = (torch.randn(E, rows, cols, generator=g) * 120).clamp(-448, 448).to(FP8)
        deq = q.float().reshape(E, rows // BLOCK, BLOCK, cols // BLOCK, BLOCK) * s[:, :, None, :, None]
        return q, s, deq.reshape(E, rows, cols)

    w13, s13, d13 = one(2 * I, H, H)
    w2, s2, d2 = one(H, I, I)
    return w13, s13, d13, w2, s2, d2


def block_routed_pipeline(x, d13, d2, ids, wts, dt, round_rows):
    """The block-fp8 pipeline on dequantised weights in ``dt``: x quantised per 1 x 128 group
    (the kernels' bits), y per (pair, 128 columns), each pair's row rounded to bf16 if asked."""
    from densemoe.reference import quantize_per_token_group_ref, routed_experts_ref

    E, two_i, H = d13.shape
    I = two_i // 2
    M = x.shape[0]
    xq, sx = quantize_per_token_group_ref(x)
    xd = (xq.float().reshape(M, H // BLOCK, BLOCK) * sx[:, :, None]).reshape(M, H)
    w1k, w2k = d13.reshape(E * two_i, H), d2.permute(1, 0, 2).reshape(H, E * I)
    one = torch.ones(E)
    if not round_rows:
        return routed_experts_ref(xd, w1k, one, w2k, one, ids, wts, y_group=BLOCK, compute_dtype=dt).to(BF16)
    rows = []
    for j in range(ids.shape[1]):
        ids_j = torch.full_like(ids, -1)
        ids_j[:, j] = ids[:, j]
        row = routed_experts_ref(xd, w1k, one, w2k, one, ids_j, wts, y_group=BLOCK, compute_dtype=dt)
        rows.append(row.to(BF16).float())
    return torch.stack(rows).sum(0).to(BF16)


def block_dense_pipeline(x, d13, d2, ids, wts):
    """The dense / skip path's block-fp8 pipeline in torch (float32): x in 1 x 128 groups, FC1 on
    the dequantised w1 rounded to bf16 as FC1 stores y, y quantised per (token, expert) over I,
    FC2 on the dequantised w2 weighted by the routing; bf16 out."""
    from densemoe.reference import quantize_per_token_group_ref

    E, two_i, H = d13.shape
    I = two_i // 2
    M = x.shape[0]
    xq, sx = quantize_per_token_group_ref(x)
    xd = (xq.float().reshape(M, H // BLOCK, BLOCK) * sx[:, :, None]).reshape(M, H)
    out = torch.zeros(M, H)
    for m in range(M):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            h = d13[e] @ xd[m]
            y = (torch.nn.functional.silu(h[:I]) * h[I:]).to(BF16).float()
            sc = y.abs().max() / 448 if y.abs().max() > 0 else torch.tensor(1.0)
            yq = (y / sc).clamp(-448, 448).to(FP8).float() * sc
            out[m] += wts[m, j] * (d2[e] @ yq)
    return out.to(BF16)
