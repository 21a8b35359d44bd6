"""densemoe.reference.fc2_ref against an independent per-expert loop (plain PyTorch, CPU)."""

import pytest
import torch

from _helpers import FP8, IN_DTYPES, dtype_id, errors, make_inputs, seed_of, torch_loop
from densemoe.reference import fc2_ref

SHAPES = [  # (M, N, E, I)
    (0, 16, 2, 32),
    (1, 16, 1, 32),
    (1, 48, 3, 64),
    (5, 7, 1, 64),
    (7, 40, 4, 32),
    (33, 80, 8, 32),
    (64, 100, 3, 96),
]


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N,E,I", SHAPES)
@pytest.mark.parametrize("alpha_kind", ["sparse", "dense"])
def test_ref_matches_per_expert_loop_fp64(M, N, E, I, dtype, alpha_kind):
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed_of(M, N, E, I, dtype, alpha_kind), alpha_kind)
    ref = fc2_ref(a, w, alpha, torch.float64, compute_dtype=torch.float64)
    loop = torch_loop(a, w, alpha, torch.float64, compute_dtype=torch.float64)
    assert ref.shape == (M, N) and ref.dtype == torch.float64
    if M:
        assert loop.abs().max() > 0  # the inputs are not degenerate
    scale = loop.abs().max().item() if loop.numel() else 1.0
    torch.testing.assert_close(ref, loop, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_ref_out_dtype_is_one_final_cast(dtype, out_dtype):
    a, w, alpha = make_inputs(9, 24, 3, 32, dtype, seed_of(dtype, out_dtype))
    ref64 = fc2_ref(a, w, alpha, torch.float64)
    got = fc2_ref(a, w, alpha, out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, ref64.to(out_dtype), rtol=0, atol=0)


def test_ref_default_out_dtype_is_bf16():
    a, w, alpha = make_inputs(3, 16, 2, 32, torch.bfloat16, 1)
    assert fc2_ref(a, w, alpha).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N,E,I", SHAPES)
def test_ref_fp32_compute_close_to_fp64(M, N, E, I, dtype):
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed_of("fp32", M, N, E, I, dtype))
    ref64 = fc2_ref(a, w, alpha, torch.float64)
    ref32 = fc2_ref(a, w, alpha, torch.float32, compute_dtype=torch.float32)
    assert ref32.dtype == torch.float32 and ref32.shape == (M, N)
    rel, mx = errors(ref32, ref64)
    K = E * I
    # fp32 rounding of the alpha pre-scale and of a K-long dot product
    assert rel <= 4 * K * 2.0 ** -24, rel
    if M:
        assert mx <= 4 * K * 2.0 ** -24 * (a.double().abs() @ w.double().abs().T).max().item() * \
            alpha.abs().max().item()


def test_ref_exact_on_small_integers():
    """Small integers are exact in fp8/bf16 and in every accumulation: the result is exact."""
    gen = torch.Generator().manual_seed(3)
    M, N, E, I = 4, 8, 3, 32
    a_i = torch.randint(-3, 4, (M, E * I), generator=gen).double()
    w_i = torch.randint(-3, 4, (N, E * I), generator=gen).double()
    alpha = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -1.0]])
    expect = sum(alpha[:, e:e + 1].double() * (a_i[:, e * I:(e + 1) * I] @ w_i[:, e * I:(e + 1) * I].T)
                 for e in range(E))
    for dt in IN_DTYPES:
        got = fc2_ref(a_i.to(dt), w_i.to(dt), alpha, torch.float64)
        assert torch.equal(got, expect), dt


def test_ref_fp8_inputs_are_the_rounded_values():
    """fp8 operands enter as their (rounded) fp8 values, not the pre-cast floats."""
    a, w, alpha = make_inputs(3, 16, 2, 32, FP8, 11)
    got = fc2_ref(a, w, alpha, torch.float64)
    via_f32 = fc2_ref(a.float(), w.float(), alpha, torch.float64)
    torch.testing.assert_close(got, via_f32, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["w_k", "alpha_rows", "k_not_multiple_of_e", "e_zero"])
def test_ref_raises_on_mismatched_shapes(case):
    a = torch.randn(4, 64)
    w = torch.randn(8, 64)
    alpha = torch.randn(4, 2)
    if case == "w_k":
        w = torch.randn(8, 96)
    elif case == "alpha_rows":
        alpha = torch.randn(5, 2)
    elif case == "k_not_multiple_of_e":
        alpha = torch.randn(4, 3)
    elif case == "e_zero":
        alpha = torch.randn(4, 0)
    with pytest.raises(ValueError):
        fc2_ref(a, w, alpha, torch.float64)
