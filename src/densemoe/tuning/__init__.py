"""Autotuning for densemoe's kernels (docs/tuning.md).

* ``buckets``: M buckets (token counts are never keys);
* ``cache``: keys, the user's cache (``DENSEMOE_CACHE_DIR``) and the shipped tables, read by the
  ops (``ops/fc1_configs.py``, ``ops/fc2_configs.py``, ``ops/routed_configs.py``) and the
  strategy rule (``ops/strategy.py``), and the autotune-on-miss hook;
* ``space``: every tactic of every backend, filtered by the backends' ``can_implement`` (FC1,
  FC2, the routed path);
* ``ops``: what the tuner needs to know about each tunable op (and the strategy crossovers'
  inputs);
* ``precompile``: compile a sweep's candidates before timing them;
* ``tuner``: timing on a GPU (cold L2, median), verification of the winner, recording; the
  strategy crossovers (skip / dense / routed per M bucket); it installs the autotune-on-miss
  hook.

``densemoe.tune(...)`` (``tuner.tune``) and ``python -m densemoe tune ...`` are the entry points.
"""
