"""Register densemoe in Hugging Face transformers without an explicit call.

transformers (5.x) has no plugin discovery for ``experts_implementation``: a name must be in
``ExpertsInterface`` before a model checks it. ``import densemoe`` therefore registers
``"densemoe"`` / ``"densemoe_fp8"`` as soon as ``transformers.integrations.moe`` exists: at once
if it is already imported, else through an import hook that fires when transformers imports it
(``transformers.modeling_utils`` does, before any model is built). densemoe never imports
transformers itself. ``DENSEMOE_NO_HF_REGISTER=1`` turns this off; ``densemoe.register_hf()``
registers explicitly.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import warnings

TARGET = "transformers.integrations.moe"


def _register() -> None:
    try:
        from densemoe.integrations.hf import register_hf

        register_hf()
    except Exception as exc:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"densemoe: could not register in transformers' ExpertsInterface "
                      f"({type(exc).__name__}: {exc}); call densemoe.register_hf() to see why", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``TARGET`` with the other finders and wraps its loader so that registration runs
    right after the module executes; every other import passes through untouched."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' MoE integration is loaded, else when it loads (once)."""
    if os.environ.get("DENSEMOE_NO_HF_REGISTER", "0") not in ("", "0"):
        return
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
