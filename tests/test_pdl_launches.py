"""Every Triton launch that passes ``launch_kwargs`` (PDL on Hopper) goes to a kernel that takes
the ``PDL`` constexpr (and so calls ``pdl_enter``). On the CPU the interpreter launches without
PDL, so a kernel that lacks the parameter fails only on a GPU: the tenth session's first run of
the CuTe routed FC1 lost 53 GPU tests to the tile list's launch. Checked here from the source."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import densemoe.kernels.triton as triton_kernels


def _pdl_launches(module):
    """(kernel name, line) of each ``kernel[grid](..., **launch_kwargs(...))`` in ``module``."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
            continue
        spread = [k.value for k in node.keywords if k.arg is None]
        if any(isinstance(v, ast.Call) and getattr(v.func, "id", None) == "launch_kwargs" for v in spread):
            target = node.func.value
            if isinstance(target, ast.Name):
                yield target.id, node.lineno


def test_every_pdl_launch_reaches_a_kernel_with_the_pdl_parameter():
    found = 0
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        module = importlib.import_module(f"{triton_kernels.__name__}.{info.name}")
        for name, line in _pdl_launches(module):
            kernel = getattr(module, name)
            fn = kernel.fn  # the Python function (a JITFunction's or the interpreter's)
            params = list(inspect.signature(fn).parameters)
            assert "PDL" in params, f"{module.__name__}:{line}: {name} is launched with launch_kwargs but has no PDL"
            src = inspect.getsource(fn)
            assert "pdl_enter(PDL)" in src, f"{name} takes PDL but never calls pdl_enter(PDL)"
            found += 1
    assert found >= 8, found  # the scan finds the launches (the routed path's alone have eight)
