"""The FC2 search space: every tactic described once, filtered by each backend's ``can_implement``.

The space depends on the problem (shape, dtypes, M bucket) only, never on timing, so it is the
same on every machine; configs a device cannot run at all (CuTe DSL missing, not sm_90) are
dropped by the tuner at run time and reported, not here. The spaces are sized so that one
(shape, dtype) sweep compiles a few hundred kernels: compile caches are keyed by config, not M,
so a config shared by several buckets compiles once.
"""

from __future__ import annotations

import dataclasses
import itertools

from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc2 import SMEM_BYTES, Fc2Problem, Fc2TritonConfig
from densemoe.kernels.triton.fc2 import can_implement as triton_can_implement

BACKENDS = ("triton", "cute")


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _token_tiles(m: int, choices: tuple[int, ...], keep: int) -> list[int]:
    """The ``keep`` largest token tiles not above max(16, next power of two of M): the tile that
    covers M in one piece and the smaller ones that split it."""
    top = max(choices[0], _pow2_at_least(m))
    fit = [c for c in choices if c <= top]
    return fit[-keep:]


def triton_space(problem: Fc2Problem, num_sms: int = 132) -> list[Fc2TritonConfig]:
    """Triton FC2 tactics for ``problem``: token tile x column tile x k-tile x operand swap x
    split of the experts x programs per SM; warps and pipeline depth follow from the tile."""
    p = problem
    out: list[Fc2TritonConfig] = []
    bytes_per = p.dtype.itemsize
    k_tiles = sorted({kb // bytes_per for kb in (128, 256) if p.i % (kb // bytes_per) == 0}) or [32]
    swaps = ([True] if p.m <= 128 else []) + ([False] if p.m >= 64 else [])
    for swap in swaps:
        tokens = _token_tiles(p.m, (16, 32, 64, 128) if swap else (64, 128, 256), keep=2)
        for bm, bn, bk, cps in itertools.product(tokens, (64, 128, 256), k_tiles, (1, 2)):
            warps = 8 if bm * bn >= 128 * 128 else 4
            stage = (bm + bn) * bk * bytes_per
            stages = max(2, min(6, (SMEM_BYTES // cps - 1024) // stage))
            tiles = -(-p.m // bm) * -(-p.n // bn)
            for split in sorted({0, 1, max(1, min(num_sms * cps // tiles, p.e))}):
                cfg = Fc2TritonConfig(bm, bn, bk, warps, stages, swap, True, split, cps)
                if triton_can_implement(p, cfg)[0] and cfg not in out:
                    out.append(cfg)
    return out


def cute_space(problem: Fc2Problem) -> list[Fc2CuteConfig]:
    """CuTe DSL FC2 tactics for ``problem``. Swap-AB (tokens as wgmma N) up to M = 256: token
    tile x weight tile x consumers x temporaries x cluster x k-tile. Tokens as wgmma M from
    M = 64: 64 or 128 token rows x 128/192 columns x temporaries x token-tile cluster x lockstep."""
    p = problem
    out: list[Fc2CuteConfig] = []
    k128 = 128 // p.dtype.itemsize

    def add(cfg: Fc2CuteConfig) -> None:
        if cute_fc2.can_implement(p, cfg)[0] and cfg not in out:
            out.append(cfg)

    if p.m <= 256:
        tm_fit = min(128, max(16, -(-p.m // 16) * 16))
        for tm in sorted({tm_fit, _pow2_at_least(tm_fit)} & set(range(16, 257, 16))):
            for (tn, cons), ab, (cn, cm), k in itertools.product(
                    ((64, 1), (128, 1), (128, 2), (256, 2)), (1, 2), ((1, 1), (2, 1), (1, 2)), (k128, 2 * k128)):
                if cm > 1 and -(-p.m // tm) < 2:
                    continue  # a token-tile cluster needs two token tiles
                add(Fc2CuteConfig(tile_n=tn, tile_m=tm, tile_k=k, consumers=cons, acc_buffers=ab,
                                  cluster_n=cn, cluster_m=cm))
    if p.m >= 64:
        cons = 1 if p.m <= 64 else 2
        for tn, ab, cm, ls in itertools.product((128, 192), (1, 2), (1, 2), (0, 1)):
            if cm > 1 and -(-p.m // (64 * cons)) < 2:
                continue
            add(Fc2CuteConfig(tile_n=tn, tile_m=64 * cons, tile_k=k128, consumers=cons, acc_buffers=ab,
                              cluster_m=cm, swap_ab=0, lockstep=ls))
    return out


def fc2_space(problem: Fc2Problem, backends=BACKENDS, num_sms: int = 132) -> list:
    """Every FC2 tactic of the given backends for ``problem``, in a fixed order, each one passing
    its backend's ``can_implement``; the backend's heuristic choice is always included."""
    from densemoe.ops.fc2 import default_config, default_cute_config

    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    out: list = []
    if "triton" in backends:
        space = triton_space(problem, num_sms)
        h = default_config(problem, num_sms)
        out += ([h] if h not in space else []) + space
    if "cute" in backends:
        space = cute_space(problem)
        try:
            h = default_cute_config(problem)
        except ValueError:  # no CuTe config fits this problem at all
            h = None
        out += ([h] if h is not None and h not in space else []) + space
    return out


def describe(cfg) -> str:
    """Short human form of a config for tables: only the fields that differ from the defaults."""
    fields = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default]
    return f"{cfg.backend}:" + ",".join(fields)
