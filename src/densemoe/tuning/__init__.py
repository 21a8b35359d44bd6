"""Autotuning for densemoe's kernels (docs/tuning.md).

* ``space``: every tactic of every backend, filtered by the backends' ``can_implement``;
* ``buckets``: M buckets (token counts are never keys);
* ``cache``: keys, the user's cache (``DENSEMOE_CACHE_DIR``) and the shipped tables;
* ``tuner``: timing on a GPU (cold L2, median), verification of the winner, recording.

``densemoe.tune(...)`` and ``python -m densemoe tune ...`` are the entry points.
"""

from densemoe.tuning.buckets import bucket_range, m_bucket

__all__ = ["m_bucket", "bucket_range", "tune"]


def tune(*args, **kwargs):
    """See ``densemoe.tuning.tuner.tune``."""
    from densemoe.tuning.tuner import tune as _tune

    return _tune(*args, **kwargs)
