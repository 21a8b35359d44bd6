"""densemoe.fc2 argument checks: every bad input raises TypeError/ValueError naming the argument
and what was expected, before any kernel runs (so these run with or without a GPU/interpreter)."""

import re

import pytest
import torch

import densemoe
from densemoe.kernels.triton.fc2 import Fc2TritonConfig
from densemoe.ops import _validate as v

FP8 = torch.float8_e4m3fn
M, N, E, I = 4, 16, 2, 32
K = E * I


@pytest.fixture(autouse=True)
def cpu_allowed(monkeypatch):
    """CPU tensors pass the device check only under the interpreter (on now and when densemoe
    was imported); the checks under test all raise before any kernel launch, so this is safe
    even where the kernels target a GPU."""
    from densemoe import _runtime

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_runtime, "_INTERPRET_AT_IMPORT", True)


def inputs(m=M, n=N, e=E, i=I, dtype=torch.bfloat16):
    a = torch.randn(m, e * i).to(dtype)
    w = torch.randn(n, e * i).to(dtype)
    alpha = torch.randn(m, e)
    return a, w, alpha


def raises(exc, pattern, *args, **kw):
    with pytest.raises(exc, match=pattern) as info:
        densemoe.fc2(*args, **kw)
    assert str(info.value).startswith("densemoe.fc2: "), str(info.value)
    return info


# ---- dtypes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [torch.float32, torch.float16, torch.float64, torch.int8])
def test_a_dtype(bad):
    a, w, alpha = inputs()
    name = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
            torch.int8: "int8"}[bad]
    raises(TypeError, rf"\ba must be float8_e4m3fn or bfloat16, got {name}$", a.to(bad), w.to(bad), alpha)


@pytest.mark.parametrize("a_dt,w_dt,w_name", [(torch.bfloat16, FP8, "float8_e4m3fn"),
                                               (FP8, torch.bfloat16, "bfloat16"),
                                               (torch.bfloat16, torch.float32, "float32")])
def test_w_dtype_differs_from_a(a_dt, w_dt, w_name):
    a, w, alpha = inputs()
    a_name = "bfloat16" if a_dt == torch.bfloat16 else "float8_e4m3fn"
    raises(TypeError, rf"\bw must have a's dtype \({a_name}\), got {w_name}",
           a.to(a_dt), w.to(w_dt), alpha)


@pytest.mark.parametrize("bad,name", [(torch.bfloat16, "bfloat16"), (torch.float64, "float64"),
                                      (torch.float16, "float16")])
def test_alpha_dtype(bad, name):
    a, w, alpha = inputs()
    raises(TypeError, rf"\balpha must be float32, got {name}", a, w, alpha.to(bad))


# ---- types and ranks ------------------------------------------------------------------------

@pytest.mark.parametrize("which,bad", [
    (which, bad) for which in ("a", "w", "alpha", "out") for bad in ([[1.0]], 3.0, None)
    if not (which == "out" and bad is None)  # out=None is the default
], ids=lambda x: x if isinstance(x, str) else type(x).__name__)
def test_not_a_tensor(which, bad):
    args = dict(zip(("a", "w", "alpha"), inputs()))
    args[which] = bad
    kw = {}
    if which == "out":
        kw["out"] = args.pop("out")
    raises(TypeError, rf"\b{which} must be a torch\.Tensor, got {type(bad).__name__}",
           args["a"], args["w"], args["alpha"], **kw)


@pytest.mark.parametrize("which", ["a", "w", "alpha", "out"])
@pytest.mark.parametrize("rank", [1, 3])
def test_not_2d(which, rank):
    a, w, alpha = inputs()
    args = {"a": a, "w": w, "alpha": alpha, "out": torch.empty(M, N, dtype=torch.bfloat16)}
    x = args[which]
    args[which] = x.reshape(-1) if rank == 1 else x.unsqueeze(0)
    shape = re.escape(str(tuple(args[which].shape)))
    raises(ValueError, rf"\b{which} must be 2-D, got shape {shape}",
           args["a"], args["w"], args["alpha"], out=args["out"])


# ---- shapes ---------------------------------------------------------------------------------

def test_k_mismatch():
    a, _, alpha = inputs()
    w = torch.randn(N, K + 32).to(torch.bfloat16)
    raises(ValueError, rf"\bw has K={K + 32} columns but a has K={K}", a, w, alpha)


def test_k_not_divisible_by_e():
    a, w, _ = inputs()  # K = 64
    alpha = torch.randn(M, 3)
    raises(ValueError, r"K=64 \(a\.shape\[1\]\) must be a positive multiple of E=3 \(alpha\.shape\[1\]\)",
           a, w, alpha)


def test_k_zero():
    a = torch.empty(M, 0, dtype=torch.bfloat16)
    w = torch.empty(N, 0, dtype=torch.bfloat16)
    raises(ValueError, r"K=0 \(a\.shape\[1\]\) must be a positive multiple of E=1", a, w, torch.randn(M, 1))


@pytest.mark.parametrize("e,i", [(2, 48), (1, 16), (3, 40), (4, 8)])
def test_i_not_multiple_of_32(e, i):
    a, w, alpha = inputs(e=e, i=i)
    raises(ValueError, rf"I = K / E = {e * i} / {e} = {i} per expert must be a multiple of 32", a, w, alpha)


def test_i_not_multiple_of_32_even_when_m_zero():
    a, w, alpha = inputs(m=0, e=2, i=48)
    raises(ValueError, r"I = K / E = 96 / 2 = 48 per expert must be a multiple of 32", a, w, alpha)


def test_e_zero():
    a, w, _ = inputs()
    raises(ValueError, r"\balpha must have E >= 1 columns \(one per expert\), got shape \(4, 0\)",
           a, w, torch.empty(M, 0))


@pytest.mark.parametrize("rows", [M - 1, M + 1, 0])
def test_alpha_rows(rows):
    a, w, _ = inputs()
    raises(ValueError, rf"\balpha has {rows} rows, expected M={M} \(a\.shape\[0\]\)", a, w, torch.randn(rows, E))


# ---- out / out_dtype ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(M, N + 1), (M + 1, N), (N, M), (0, N)])
def test_out_shape(shape):
    a, w, alpha = inputs()
    out = torch.empty(shape, dtype=torch.bfloat16)
    raises(ValueError, re.escape(f"out has shape {shape}, expected (M, N) = ({M}, {N})"), a, w, alpha, out=out)


@pytest.mark.parametrize("bad,name", [(torch.float64, "float64"), (torch.int32, "int32"),
                                      (FP8, "float8_e4m3fn"), (torch.int8, "int8")])
def test_out_dtype_of_out(bad, name):
    a, w, alpha = inputs()
    out = torch.empty(M, N, dtype=bad)
    raises(TypeError, rf"\bout must be bfloat16 or float16 or float32, got {name}", a, w, alpha, out=out)
    # an out_dtype that agrees with the bad out is still rejected for out's dtype
    raises(TypeError, rf"\bout must be bfloat16 or float16 or float32, got {name}", a, w, alpha, out=out,
           out_dtype=bad)


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, FP8, torch.int32])
def test_out_dtype_unsupported(bad):
    a, w, alpha = inputs()
    raises(TypeError, rf"\bout_dtype must be bfloat16, float16 or float32, got {re.escape(str(bad))}",
           a, w, alpha, out_dtype=bad)


@pytest.mark.parametrize("out_dt,arg_dt,out_name,arg_name", [
    (torch.float32, torch.bfloat16, "float32", "bfloat16"),
    (torch.bfloat16, torch.float16, "bfloat16", "float16"),
])
def test_out_dtype_conflicts_with_out(out_dt, arg_dt, out_name, arg_name):
    a, w, alpha = inputs()
    out = torch.empty(M, N, dtype=out_dt)
    raises(TypeError, rf"\bout has dtype {out_name} but out_dtype={arg_name}", a, w, alpha, out=out,
           out_dtype=arg_dt)


def test_out_non_unit_column_stride():
    a, w, alpha = inputs()
    out = torch.empty(N, M, dtype=torch.bfloat16).T  # (M, N), strides (1, M)
    raises(ValueError, r"\bout must have unit column stride and non-overlapping rows, got strides \(1, 4\)",
           a, w, alpha, out=out)
    out = torch.empty(M, 2 * N, dtype=torch.bfloat16)[:, ::2]  # strides (2N, 2)
    raises(ValueError, r"\bout must have unit column stride", a, w, alpha, out=out)


def test_out_overlapping_rows():
    a, w, alpha = inputs()
    out = torch.empty(M + N, dtype=torch.bfloat16).as_strided((M, N), (1, 1))
    raises(ValueError, r"\bout must have unit column stride and non-overlapping rows, got strides \(1, 1\)",
           a, w, alpha, out=out)


# ---- pinned configs -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,dtype,why", [
    (Fc2TritonConfig(16, 16, 64), torch.bfloat16, "block_k=64 does not divide I=32"),
    (Fc2TritonConfig(24, 16, 32), torch.bfloat16, "block_m=24 must be a power of two in [16, 256]"),
    (Fc2TritonConfig(16, 8, 32), torch.bfloat16, "block_n=8 must be a power of two in [16, 256]"),
    (Fc2TritonConfig(16, 16, 16), FP8, "block_k=16 below the MMA's k (32)"),
    (Fc2TritonConfig(16, 16, 32, num_warps=2), torch.bfloat16, "num_warps=2 not in (4, 8)"),
    (Fc2TritonConfig(16, 16, 32, split=-1), torch.bfloat16, "split=-1 must be >= 0"),
    (Fc2TritonConfig(16, 16, 32, ctas_per_sm=5), torch.bfloat16, "ctas_per_sm=5 not in 1..4"),
    (Fc2TritonConfig(16, 16, 32, num_stages=0), torch.bfloat16, "num_stages must be >= 1"),
    (Fc2TritonConfig(256, 256, 32, num_warps=4), torch.bfloat16, "accumulators need"),
])
def test_config_rejected(cfg, dtype, why):
    a, w, alpha = inputs(dtype=dtype)
    raises(ValueError, r"\bconfig .* cannot run this problem: " + re.escape(why), a, w, alpha, config=cfg)


def test_config_smem_rejected():
    a, w, alpha = inputs(e=1, i=256)
    cfg = Fc2TritonConfig(128, 128, 256, num_warps=8, num_stages=6)
    raises(ValueError, r"\bconfig .* cannot run this problem: needs \d+ B of shared memory", a, w, alpha, config=cfg)


# ---- devices --------------------------------------------------------------------------------

def test_same_device_meta_next_to_cpu():
    cpu = torch.empty(2, 2)
    meta = torch.empty(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"densemoe\.fc2: w is on meta but a is on cpu; "
                                         r"all tensors must be on one device"):
        v.same_device("densemoe.fc2", a=cpu, w=meta)
    with pytest.raises(ValueError, match=r"out is on cpu but a is on meta"):
        v.same_device("densemoe.fc2", a=meta, w=meta, alpha=meta, out=cpu)


def test_same_device_all_meta():
    meta = torch.empty(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"tensors are on meta; densemoe's kernels run on CUDA devices"):
        v.same_device("densemoe.fc2", a=meta, w=meta)


@pytest.mark.parametrize("which", ["w", "alpha", "out"])
def test_fc2_device_mismatch_meta(which):
    a, w, alpha = inputs()
    args = {"a": a, "w": w, "alpha": alpha, "out": torch.empty(M, N, dtype=torch.bfloat16)}
    args[which] = args[which].to("meta")
    raises(ValueError, rf"\b{which} is on meta but a is on cpu",
           args["a"], args["w"], args["alpha"], out=args["out"])


@pytest.mark.parametrize("env", ["0", "", None])
@pytest.mark.parametrize("with_out", [False, True])
def test_cpu_without_interpreter(monkeypatch, env, with_out):
    a, w, alpha = inputs()
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    kw = {"out": torch.empty(M, N, dtype=torch.bfloat16)} if with_out else {}
    raises(ValueError, r"tensors are on cpu; densemoe's kernels run on CUDA devices .*TRITON_INTERPRET=1",
           a, w, alpha, **kw)


def test_cpu_without_interpreter_even_when_empty(monkeypatch):
    """M = 0 still checks the device (nothing is launched, but the contract is the same)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, w, alpha = inputs(m=0)
    raises(ValueError, r"CUDA", a, w, alpha)
