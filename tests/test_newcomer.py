"""What a newcomer hit on a fresh clone, each fixed and held here: ``import densemoe`` loads the
routers; Triton's interpreter gives right bf16 and fp8 results outside pytest too, and says what to
do when it is switched on too late; the command lines answer a missing GPU or argument in one
line; bad arguments to the layer's entry points name the function, the argument, what was given
and what was expected."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import densemoe
from _helpers import seed_of

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BF16 = torch.bfloat16


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, from outside the tests (no conftest)."""
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(DENSEMOE_NO_HF_REGISTER="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=full, cwd=str(ROOT))


def test_import_loads_the_routers_and_the_references():
    r = _python("""
        import densemoe
        print(densemoe.routing.softmax_topk.__name__, densemoe.reference.fc2_ref.__name__)
    """)
    assert r.returncode == 0 and "softmax_topk fc2_ref" in r.stdout, r.stderr[-2000:]


_INTERPRETED = """
    import torch, densemoe
    from densemoe.reference import fc1_ref, fc2_ref
    g = torch.Generator().manual_seed(0)
    M, N, E, I = 7, 64, 4, 32
    for dt in (torch.bfloat16, torch.float8_e4m3fn):
        a = torch.randn(M, E * I, generator=g).to(dt)
        w = (torch.randn(N, E * I, generator=g) * 0.5).to(dt)
        alpha = torch.randn(M, E, generator=g)
        out = densemoe.fc2(a, w, alpha, skip=False)
        ref = fc2_ref(a, w, alpha, torch.float64)
        print("fc2", dt, ((out.double() - ref).norm() / ref.norm()).item())
    x = torch.randn(M, 64, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(2 * E * I, 64, generator=g) * 0.1).to(torch.bfloat16)
    y = densemoe.fc1(x, w1, torch.ones(E), out_dtype=torch.float8_e4m3fn, out_scale=torch.tensor([0.01]))
    ref = fc1_ref(x, w1, torch.ones(E), out_dtype=torch.float8_e4m3fn, out_scale=torch.tensor([0.01]))
    print("fc1 fp8 out", (y.float() - ref.float()).abs().max().item(), ref.float().abs().max().item())
"""


def test_the_interpreter_outside_pytest_gives_right_bf16_and_fp8_results():
    """``import densemoe`` applies its fixes to Triton's interpreter (bf16 dot, bf16 and fp8
    rounding): without them bf16 came out ~1e10 off and fp8 outputs mis-rounded."""
    r = _python(_INTERPRETED, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict((ln.split(" ", 2)[1], ln) for ln in r.stdout.splitlines() if ln.startswith("fc2"))
    for ln in lines.values():
        assert float(ln.split()[-1]) < 1e-2, r.stdout  # bf16 out: ~3e-3; fp8 inputs alike
    fc1 = next(ln for ln in r.stdout.splitlines() if ln.startswith("fc1"))
    diff, top = map(float, fc1.split()[-2:])
    assert diff <= top / 16, r.stdout  # within one fp8 e4m3 step of the rounded reference


def test_the_interpreter_switched_on_after_import_says_what_to_do():
    r = _python("""
        import os, torch, densemoe
        os.environ["TRITON_INTERPRET"] = "1"
        a = torch.randn(3, 64).to(torch.bfloat16)
        try:
            densemoe.fc2(a, torch.randn(16, 64).to(torch.bfloat16), torch.rand(3, 2))
        except ValueError as exc:
            print("ERROR", exc)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR densemoe.fc2:" in r.stdout and "before importing densemoe" in r.stdout, r.stdout


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answers")


def _one_line_failure(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


@no_gpu
def test_cli_tune_without_a_gpu_is_one_line():
    _one_line_failure(_python("import sys; from densemoe.__main__ import main; sys.exit(main(['tune']))"),
                      "CUDA GPU", "--dry-run")


@pytest.mark.parametrize("args, words", [
    (["tune", "--shape", "llama"], ["--shape", "deepseek-v3-tp8"]),
    (["tune", "--dtypes", "fp4"], ["--dtypes", "fp8"]),
    (["tune", "--op", "fc3"], ["--op", "fc1"]),
    (["tune", "--m", "1-x"], ["--m"]),
])
def test_cli_tune_bad_arguments_are_one_line(args, words):
    _one_line_failure(_python(f"import sys; from densemoe.__main__ import main; sys.exit(main({args!r}))"), *words)


def test_cli_help_names_the_shapes_and_lists_them():
    r = _python("import sys; from densemoe.__main__ import main; sys.exit(main(['tune', '--help']))")
    assert "deepseek-v3-tp8" in r.stdout and "qwen3-30b-a3b" in r.stdout and "MISSION" not in r.stdout
    r = _python("import sys; from densemoe.__main__ import main; sys.exit(main(['shapes']))")
    assert r.returncode == 0 and "| deepseek-v3-tp8 | 7168 | 256 | 256 | 8 |" in r.stdout, r.stdout


def test_bench_plot_without_out_is_one_line():
    _one_line_failure(_python("import sys; from densemoe.bench.__main__ import main; sys.exit(main(['plot']))"),
                      "--out")
    _one_line_failure(_python("import sys; from densemoe.bench.__main__ import main; "
                              "sys.exit(main(['plot', '--out', '/nonexistent/x']))"), "does not exist")
    _one_line_failure(_python("import sys; from densemoe.bench.__main__ import main; "
                              "sys.exit(main(['skip', '--shapes', 'llama']))"), "--shapes", "deepseek-v3-tp8")


# ------------------------------------------------------------------ errors that name what was wrong

def _experts(E=4, I=32, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(BF16), (torch.randn(E, H, I, generator=g) * 0.1).to(BF16)


def test_experts_forward_names_its_bad_arguments():
    w13, w2 = _experts()
    prepared = densemoe.prepare_weights(w13, w2, dtype="bf16")
    x = torch.randn(3, 64).to(BF16)
    alpha = torch.rand(3, 4)
    with pytest.raises(TypeError, match=r"experts_forward: prepared must be the PreparedWeights .* got Tensor"):
        densemoe.experts_forward(x, w13, alpha)
    with pytest.raises(ValueError, match=r"experts_forward: alpha must be a \[M, E\] = \[3, 4\] tensor .* got \(3, 5\)"):
        densemoe.experts_forward(x, prepared, torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"experts_forward: alpha must be .* got \(4,\)"):
        densemoe.experts_forward(x, prepared, torch.rand(4))
    with pytest.raises(TypeError, match=r"experts_forward: alpha must have a floating dtype, got torch.int64"):
        densemoe.experts_forward(x, prepared, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"experts_forward: x must be a \[M, H=64\] tensor, got \(3, 32\)"):
        densemoe.experts_forward(x[:, :32], prepared, alpha)
    with pytest.raises(ValueError, match=r"experts_forward: top_k must be an int in \[1, E=4\], got 9"):
        densemoe.experts_forward(x, prepared, alpha, top_k=9)
    with pytest.raises(TypeError, match=r"experts_forward: skip must be None, True or False, got 'yes'"):
        densemoe.experts_forward(x, prepared, alpha, skip="yes")


def test_dense_moe_names_its_bad_arguments():
    w13, w2 = _experts()
    prepared = densemoe.prepare_weights(w13, w2, dtype="bf16")
    gate = torch.randn(4, 64).to(BF16)
    with pytest.raises(TypeError, match=r"DenseMoE: prepared must be the PreparedWeights"):
        densemoe.DenseMoE(w13, gate, 2)
    with pytest.raises(ValueError, match=r"DenseMoE: top_k must be an int in \[1, E=4\], got 0"):
        densemoe.DenseMoE(prepared, gate, 0)


def test_fused_experts_blames_the_argument_that_is_wrong():
    w13, w2 = _experts()
    x = torch.randn(3, 64).to(BF16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]])
    wts = torch.rand(3, 2)
    w1_t = torch.randn(4, 64, 128).to(BF16)  # [E, H, 2I]: transposed
    with pytest.raises(ValueError, match=r"fused_experts: w1 must be \[E, 2I, H=64\].*got \(4, 64, 128\) "
                                         r"\(it looks transposed"):
        densemoe.fused_experts(x, w1_t, w2, wts, ids)
    with pytest.raises(ValueError, match=r"fused_experts: w2 must be \[E, H, I\] = \[4, 64, 32\] .* transposed"):
        densemoe.fused_experts(x, w13, w2.transpose(1, 2).contiguous(), wts, ids)
    with pytest.raises(ValueError, match=r"fused_experts: topk_weights and topk_ids must both be \[M, k\]"):
        densemoe.fused_experts(x, w13, w2, wts[:, :1], ids)
    with pytest.raises(ValueError, match=r"fused_experts: an fp8 w1 needs its dequantisation scale w1_scale"):
        densemoe.fused_experts(x, w13.to(torch.float8_e4m3fn), w2, wts, ids)


def test_prepare_weights_refuses_an_intermediate_size_fc2_cannot_take():
    g = torch.Generator().manual_seed(seed_of("I16"))
    w13 = torch.randn(4, 32, 64, generator=g).to(BF16)  # I = 16
    w2 = torch.randn(4, 64, 16, generator=g).to(BF16)
    with pytest.raises(ValueError, match=r"prepare_weights: .* I must be a multiple of 32 .* I = 16"):
        densemoe.prepare_weights(w13, w2, dtype="bf16")
    with pytest.raises(TypeError, match=r"prepare_weights: w13 must have a floating dtype"):
        densemoe.prepare_weights(torch.ones(4, 64, 64, dtype=torch.int32), w2, dtype="bf16")


def test_the_package_declares_its_license_and_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert 'license = { text = "Apache-2.0" }' in pyproject
    assert all(f"\n{extra} = [" in pyproject for extra in ("dev", "cute", "bench"))
    readme = (ROOT / "README.md").read_text()
    assert ".[bench]" in readme and ".[cute]" in readme and ".[dev]" in readme
