"""M buckets: token counts are never compile or cache keys; tuned entries are keyed by bucket.

A bucket is named by its largest M. Up to 64 the buckets are powers of two (1, 2, 4, ..., 64);
above, they grow by 1.5x and 4/3x in turn (96, 128, 192, 256, 384, 512, 768, 1024, ...), which
puts every point of the token sweep (``shapes.M_SWEEP``) at the top of its own bucket. Entries are tuned at the
bucket's top M (the bucket's largest, slowest call).
"""

from __future__ import annotations


def m_bucket(m: int) -> int:
    """The bucket (its largest M) that holds ``m`` tokens; M <= 1 (including 0) is bucket 1."""
    if m <= 1:
        return 1
    if m <= 64:
        return 1 << (m - 1).bit_length()
    b = 64
    while b < m:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def bucket_range(bucket: int) -> tuple[int, int]:
    """(lo, hi]: the token counts that map to ``bucket`` (lo is the previous bucket's top)."""
    if m_bucket(bucket) != bucket:
        raise ValueError(f"{bucket} is not a bucket (m_bucket({bucket}) = {m_bucket(bucket)})")
    if bucket == 1:
        return 0, 1
    lo = bucket - 1
    while lo > 1 and m_bucket(lo) == bucket:
        lo -= 1
    return lo, bucket


def neighbours(bucket: int) -> tuple[int, ...]:
    """The buckets just below and just above ``bucket`` (none below bucket 1)."""
    lo, _ = bucket_range(bucket)
    return ((m_bucket(lo),) if lo >= 1 else ()) + (m_bucket(bucket + 1),)
