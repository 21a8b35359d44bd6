"""Autotuning for densemoe's kernels (docs/tuning.md).

* ``buckets``: M buckets (token counts are never keys);
* ``cache``: keys, the user's cache (``DENSEMOE_CACHE_DIR``) and the shipped tables, read by the
  ops (``ops/fc1_configs.py``, ``ops/fc2_configs.py``), and the autotune-on-miss hook;
* ``space``: every tactic of every backend, filtered by the backends' ``can_implement``;
* ``ops``: what the tuner needs to know about each tunable op;
* ``precompile``: compile a sweep's candidates before timing them;
* ``tuner``: timing on a GPU (cold L2, median), verification of the winner, recording; it
  installs the autotune-on-miss hook.

``densemoe.tune(...)`` (``tuner.tune``) and ``python -m densemoe tune ...`` are the entry points.
"""
