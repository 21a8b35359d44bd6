"""What the Triton FC1 k-loops are in SASS (no GPU: compiled for sm_90a with the installed Triton,
disassembled with the nvdisasm in its wheel; ninth session, docs/routed-journal.md).

For the dense FC1 (``kernels.triton.fc1._fc1_kernel``, TMA) and the routed FC1
(``kernels.triton.routed._fc1_kernel``, x gathered) at the tiles the tables pick at large M (128
x 128, 8 warps, 4 stages; 64 x 128, 4 warps, 2 stages), fp8, this prints the innermost loop that
holds the wgmmas as a sequence: each wgmma group (QGMMA instructions), each wait on them
(``WARPGROUP.DEPBAR.LE gsb0, n``: n groups may stay in flight), runs of fp32 adds (FADD), and the
CTA-wide barriers (``BAR.SYNC``), which hold the CTA's warpgroups in step.

Since f759edd every fp8 product carries ``max_num_imprecise_acc`` = its k-tile (each k-tile's sum
added into fp32, docs/routed.md "fp8 accumulation"). In SASS that is: the gate group, a wait for
0, 64 FADD, the up group, a wait for 0, 64 FADD, with CTA barriers in the loop, in the dense and
the routed kernel alike. So the tensor cores idle through every wait and add of both
warpgroups of a CTA at once; only another CTA on the SM can fill the gap.

``--forms``: a minimal TMA loop (one dot a k-step, 128 x 128 x 128 fp8, 8 warps) in four forms of
the fp32 promotion (Triton's max_num_imprecise_acc; acc += dot; the add lagged one k-step
behind; the fast accumulation without promotion). With Triton 3.9 only the fast accumulation
keeps a group in flight (wait 1); every promoted form waits for 0 after each dot, the lagged add
included (Triton waits for a dot's result where it is defined, not where it is used). ``--ws``:
the same under Triton's ``warp_specialize`` at 4 warps: Triton 3.6 (the device's) specialises
the loop and waits for 0 after every dot in every form, Triton's own promotion after each
wgmma instruction; the lagged form fails to compile; Triton 3.9's pass fails on every form.

``--promote``: a 64 x 128 fp8 TMA loop at k-tiles of 256, 128 and 64 bytes, with
``max_num_imprecise_acc`` = the k-tile, = min(k-tile, 128), and without promotion (eleventh
session, docs/trust.md): at 256, min(k-tile, 128) makes Triton 3.6 and 3.9 wait after every
wgmma instruction (8 waits a k-tile), where = the k-tile waits once.

    python bench/probes/fc1_loop_sass.py [--forms] [--ws] [--promote]     (CPU; the installed Triton)

Run 2026-12-05 (ninth session) with Triton 3.9.0 (this machine) and, for ``--ws``, Triton 3.6.0 in
a virtual environment (the device's version): results in docs/routed-journal.md "Ninth session".
"""

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

from routed_mma_waits import compile_ as _compile  # (run from bench/probes, as the docstring says)

FP8 = "fp8e4nv"
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_(kernel, ptrs, const, warps, stages):
    # M and K are 16-divisible too at the model shapes this probe compiles
    return _compile(kernel, ptrs, const, warps, stages, divisible=("H", "I", "M", "K"))


def sass(k) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    return out.splitlines()


def wgmma_loop(lines: list[str]) -> str:
    """The innermost backward branch whose span holds a wgmma, as a compressed sequence."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line.strip()))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            lo = labels[m.group(1)]
            if any("GMMA" in x for x in lines[lo:i]) and (best is None or i - lo < best[1] - best[0]):
                best = (lo, i)
    if best is None:
        return "(no loop with a wgmma)"
    seq = []
    for line in lines[best[0]:best[1] + 1]:
        ins = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line).split(" ;")[0].strip()
        ins = re.sub(r"^@!?U?P[0-9T] ", "", ins)
        if "GMMA" in ins:
            tag = "wgmma"
        elif ins.startswith("WARPGROUP.DEPBAR"):
            tag = "wait" + ins.split(",")[-1].strip().replace("0x", "")
        elif ins.startswith("FADD"):
            tag = "FADD"
        elif ins.startswith("BAR.SYNC"):
            tag = "BAR.SYNC"
        else:
            continue
        if seq and seq[-1][0] == tag:
            seq[-1][1] += 1
        else:
            seq.append([tag, 1])
    return " ".join(f"{t}x{n}" if n > 1 else t for t, n in seq)


def fc1_kernels():
    from densemoe.kernels.triton.fc1 import _fc1_kernel as dense
    from densemoe.kernels.triton.routed import _fc1_kernel as routed

    for bm, bi, warps, st in ((128, 128, 8, 4), (64, 128, 4, 2)):
        k = compile_(dense, dict(x_ptr="*" + FP8, w_ptr="*" + FP8, x_desc=f"tensordesc<{FP8}[{bm}, 128]>",
                                 w_desc=f"tensordesc<{FP8}[{bi}, 128]>", alpha1_ptr="*fp32", xs_ptr="*fp32",
                                 post_ptr="*fp32", route_ptr="*fp32", y_ptr="*bf16", oscale_ptr="*fp32",
                                 ys_ptr="*fp32", xg_ptr="*fp32", wb_ptr="*fp32"),
                     dict(HAS_XS=True, HAS_POST=False, HAS_ROUTE=False, OUT_FP8=False, DYN_SCALE=False, BLOCK_M=bm,
                          BLOCK_I=bi, BLOCK_K=128, SWAP_AB=False, USE_TMA=True, NUM_STAGES=st), warps, st)
        print(f"dense FC1 {bm}x{bi} w{warps} st{st}: {wgmma_loop(sass(k))}")
        k = compile_(routed, dict(x_ptr="*" + FP8, w_ptr="*" + FP8, w_desc=f"tensordesc<{FP8}[{bi}, 128]>",
                                  alpha1_ptr="*fp32", xs_ptr="*fp32", ws_ptr="*fp32", sorted_ptr="*i32",
                                  offsets_ptr="*i32", y_ptr="*" + FP8, ys_ptr="*fp32"),
                     dict(HAS_XS=True, OUT_FP8=True, E_PAD=128, BLOCK_M=bm, BLOCK_I=bi, BLOCK_K=128, SWAP_AB=False,
                          NUM_STAGES=st, USE_TMA=True), warps, st)
        print(f"routed FC1 {bm}x{bi} w{warps} st{st}: {wgmma_loop(sass(k))}")


def forms(ws: bool):
    @triton.jit
    def loop(a_desc, b_desc, c_ptr, K, FORM: tl.constexpr, WS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, ST: tl.constexpr):
        acc = tl.zeros((BM, BN), tl.float32)
        prev = tl.zeros((BM, BN), tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=ST, warp_specialize=WS):
            a = a_desc.load([0, k0])
            b = b_desc.load([0, k0])
            if FORM == 0:  # the library's: Triton's per-k-tile promotion
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BK)
            elif FORM == 1:
                acc += tl.dot(a, tl.trans(b))
            elif FORM == 2:  # the add one k-step behind the dot
                acc += prev
                prev = tl.dot(a, tl.trans(b))
            else:  # fast accumulation, no promotion
                acc = tl.dot(a, tl.trans(b), acc)
        acc += prev
        offs_m = tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)

    names = ("max_num_imprecise_acc", "acc += dot", "add lagged", "fast (no promotion)")
    for form, name in enumerate(names):
        label = f"form {name}{' (warp_specialize, 4 warps)' if ws else ''}"
        try:
            k = compile_(loop, dict(a_desc=f"tensordesc<{FP8}[128, 128]>", b_desc=f"tensordesc<{FP8}[128, 128]>",
                                    c_ptr="*fp32"), dict(FORM=form, WS=ws, BM=128, BN=128, BK=128, ST=4),
                         4 if ws else 8, 4)
        except Exception as exc:  # noqa: BLE001 - a pass that fails is a finding
            print(f"{label}: compile failed ({str(exc).splitlines()[0][:100]})", flush=True)
            continue
        print(f"{label}: {wgmma_loop(sass(k))}", flush=True)


def promote_interval():
    @triton.jit
    def loop(a_desc, b_desc, c_ptr, K, FORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             ST: tl.constexpr):
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=ST):
            a = a_desc.load([0, k0])
            b = b_desc.load([0, k0])
            if FORM == 0:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BK)
            elif FORM == 1:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=128 if BK > 128 else BK)
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        offs_m = tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)

    names = ("max_num_imprecise_acc = k-tile", "max_num_imprecise_acc = min(k-tile, 128)", "no promotion")
    for bk in (256, 128, 64):
        for form, name in enumerate(names):
            k = compile_(loop, dict(a_desc=f"tensordesc<{FP8}[64, {bk}]>", b_desc=f"tensordesc<{FP8}[128, {bk}]>",
                                    c_ptr="*fp32"), dict(FORM=form, BM=64, BN=128, BK=bk, ST=3), 4, 3)
            print(f"k-tile {bk}, {name}: {wgmma_loop(sass(k))}", flush=True)


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    print(f"# triton {triton.__version__}; the innermost loop holding the wgmmas, in SASS order")
    if "--promote" in sys.argv:
        promote_interval()
    elif "--forms" in sys.argv:
        forms("--ws" in sys.argv)
    else:
        fc1_kernels()
