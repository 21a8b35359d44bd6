"""One TMA load a row: can the CuTe routed FC1's producer gather x's rows straight from x [M, H]
(no sorted copy) into its 128-byte-swizzled stage? (docs/routed-journal.md, twelfth session, Next 2.)

Hopper's TMA has no gather, but a box of one row by the k-tile, issued once per row at the row's
place in the stage, lands as the whole tile's box would if the swizzle is a function of the
shared-memory address (the 128-byte swizzle XORs address bits 4-6 with bits 7-9, and a row
starts at a 128-byte boundary of a 1024-byte-aligned stage). The producer warp issues the 128
loads of a 128-row stage on one mbarrier with the stage's transaction bytes (CuTe DSL wraps each
TMA copy in ``elect.sync``: one lane issues them all, one after another); the kernel then reads
the stage through the wgmma layout (the swizzled view the consumers use) and writes it out. (One
thread issuing 128 loads a stage may bound the producer: a later probe should time it inside an
FC1 k-loop.)

    python bench/probes/row_tma_gather.py            (a CUDA GPU and CuTe DSL: runs and checks
                                                      out[r] == x[idx[r], k-tile] for several k-tiles)
    CUTE_DSL_ARCH=sm_90a python bench/probes/row_tma_gather.py --compile
                                                     (no GPU: compiles, counts the loads in the PTX)
"""

import glob
import os
import sys
import tempfile

TILE_M, TILE_K, STAGES, H = 128, 128, 2, 7168


def build():
    import cutlass
    import cutlass.cute as cute
    from cutlass.cutlass_dsl import Int32

    from densemoe.kernels.cute import hopper

    fp8 = cutlass.Float8E4M3FN

    class RowGather:
        @cute.jit
        def __call__(self, x_ptr: cute.Pointer, idx_ptr: cute.Pointer, out_ptr: cute.Pointer, M: Int32, kt: Int32,
                     stream):
            mX = cute.make_tensor(x_ptr, cute.make_layout((M, H), stride=(H, 1)))
            mIdx = cute.make_tensor(idx_ptr, cute.make_layout(TILE_M))
            mOut = cute.make_tensor(out_ptr, cute.make_layout((TILE_M, TILE_K), stride=(TILE_K, 1)))
            x_layout = hopper.smem_layout(fp8, TILE_K, TILE_M, STAGES)
            one = cute.slice_(x_layout, (None, None, 0))
            # the stage's swizzle over a one-row box
            row = cute.make_composed_layout(one.inner, one.offset, cute.make_layout((1, TILE_K), stride=(TILE_K, 1)))
            atom, tX = cute.nvgpu.cpasync.make_tiled_tma_atom(cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(), mX, row,
                                                              (1, TILE_K))

            @cute.struct
            class Storage:
                mbar: cute.struct.MemRange[cutlass.Int64, 2]
                sX: cute.struct.Align[cute.struct.MemRange[fp8, cute.cosize(x_layout)], 1024]

            self.storage = Storage
            self.kernel(atom, tX, mIdx, mOut, x_layout, kt).launch(grid=[1, 1, 1], block=[128, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, atom: cute.CopyAtom, tX: cute.Tensor, mIdx: cute.Tensor, mOut: cute.Tensor,
                   x_layout: cute.ComposedLayout, kt: Int32):
            tidx, _, _ = cute.arch.thread_idx()
            st = cutlass.memory.SmemAllocator().allocate(self.storage)
            sX = st.sX.get_tensor(x_layout.outer, swizzle=x_layout.inner)
            bar = st.mbar.data_ptr()
            warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            stage = 1  # the second stage: its base is 1024-aligned too, not the allocation's start
            if tidx == 0:
                cute.arch.mbarrier_init(bar, 1)
            cute.arch.mbarrier_init_fence()
            cute.arch.barrier()
            if warp == 0:
                if tidx == 0:
                    cute.arch.mbarrier_arrive_and_expect_tx(bar, TILE_M * TILE_K)
                cute.arch.sync_warp()
                for r in cutlass.range(TILE_M, unroll=1):  # each copy is issued by one elected lane
                    s_row = cute.local_tile(sX[(None, None, stage)], (1, TILE_K), (r, 0))
                    g_row = cute.local_tile(tX, (1, TILE_K), (mIdx[r], kt))
                    ts, tg = cute.nvgpu.cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(s_row, 0, 2),
                                                              cute.group_modes(g_row, 0, 2))
                    cute.copy(atom, tg, ts, tma_bar_ptr=bar)
            cute.arch.mbarrier_wait(bar, 0)
            for c in cutlass.range(TILE_K, unroll=1):  # each thread one row, through the swizzled view
                mOut[tidx, c] = sX[tidx, c, stage]

    return RowGather()


def main(argv) -> int:
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    compile_only = "--compile" in argv
    fp8 = cutlass.Float8E4M3FN
    if compile_only:
        import cuda.bindings.driver as cuda

        dump = tempfile.mkdtemp(prefix="row_tma_")
        from cutlass.cutlass_dsl import CuTeDSL

        env = CuTeDSL._get_dsl().envar
        env.dump_dir, env.keep_ptx = dump, True
        p8 = make_ptr(fp8, 16, cute.AddressSpace.gmem, assumed_align=16)
        pi = make_ptr(cutlass.Int32, 16, cute.AddressSpace.gmem, assumed_align=16)
        cute.compile(build(), p8, pi, p8, 16, 0, cuda.CUstream(0))
        ptx = open(glob.glob(os.path.join(dump, "*.ptx"))[0]).read()
        loads = ptx.count("cp.async.bulk.tensor.2d.shared::cta.global")
        print(f"compiled for sm_90a: {loads} one-row TMA load in the PTX's row loop, elect.sync "
              f"{'before it' if 'elect.sync' in ptx else 'missing'}")
        return 0 if loads == 1 and "elect.sync" in ptx else 1
    import torch

    M = 1000
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 256, (M, H), device="cuda", dtype=torch.uint8, generator=g)
    idx = torch.randint(0, M, (TILE_M,), device="cuda", dtype=torch.int32, generator=g)
    out = torch.empty(TILE_M, TILE_K, device="cuda", dtype=torch.uint8)
    stream = torch.cuda.current_stream()
    import cuda.bindings.driver as cuda

    fn = cute.compile(build(), make_ptr(fp8, x.data_ptr(), cute.AddressSpace.gmem, assumed_align=16),
                      make_ptr(cutlass.Int32, idx.data_ptr(), cute.AddressSpace.gmem, assumed_align=16),
                      make_ptr(fp8, out.data_ptr(), cute.AddressSpace.gmem, assumed_align=16), M, 0,
                      cuda.CUstream(stream.cuda_stream))
    bad = 0
    for kt in (0, 1, H // TILE_K - 1):
        out.fill_(0xAA)
        fn(make_ptr(fp8, x.data_ptr(), cute.AddressSpace.gmem, assumed_align=16),
           make_ptr(cutlass.Int32, idx.data_ptr(), cute.AddressSpace.gmem, assumed_align=16),
           make_ptr(fp8, out.data_ptr(), cute.AddressSpace.gmem, assumed_align=16), M, kt,
           cuda.CUstream(stream.cuda_stream))
        torch.cuda.synchronize()
        want = x[idx.long(), kt * TILE_K:(kt + 1) * TILE_K]
        same = (out == want).all(dim=1)
        bad += int((~same).sum())
        print(f"k-tile {kt}: {int(same.sum())}/{TILE_M} rows land where the swizzled view reads them")
    print("row TMA gather:", "ok" if bad == 0 else f"{bad} rows wrong")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
