"""The model shapes densemoe is tuned and measured on, by name (``python -m densemoe shapes``
lists them), and the token counts of the benchmarks' and the tuner's sweep."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int  # H
    experts: int  # E (per rank)
    inter: int  # I, expert intermediate size per rank
    topk: int

    @property
    def fc2_nk(self) -> tuple[int, int]:
        return self.hidden, self.experts * self.inter

    @property
    def fc1_nk(self) -> tuple[int, int]:
        return self.experts * 2 * self.inter, self.hidden


SHAPES = {s.name: s for s in (
    MoEShape("deepseek-v3-tp8", 7168, 256, 256, 8),
    MoEShape("deepseek-v3-tp4", 7168, 256, 512, 8),
    MoEShape("qwen3-30b-a3b", 2048, 128, 768, 8),
    MoEShape("mixtral-8x7b-tp2", 4096, 8, 7168, 2),
)}
# DeepSeek-V3/R1 at tensor parallelism 8 and 4 (I per rank), Qwen3-30B-A3B on one GPU, Mixtral-8x7B at TP2

M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)  # decode, then prefill chunks


def parse_ms(text: str) -> list[int]:
    """Token counts from the command line: a comma list; ``a-b`` takes the sweep points in [a, b]."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = map(int, part.split("-"))
            out += [m for m in M_SWEEP if lo <= m <= hi]
        else:
            out.append(int(part))
    return out
