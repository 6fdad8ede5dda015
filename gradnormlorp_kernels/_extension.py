"""The compiled extension `gradnormlorp_kernels._C`, if it was built and loads against this torch.

Import never fails because of it: `load_error()` says why it is absent, and the ops fall back.

The kernels are reached as `cpu_<op>` / `cuda_<op>` attributes of this module (what the ops register
with `register_backend`). Looking one up raises ImportError when the extension, or its CUDA part, is
missing, so the registry records why and runs the reference instead.
"""

from __future__ import annotations

import functools
import importlib

import torch

_module = None
_error: str | None = None

_KERNELS = ("row_norm", "adapter_row_norm", "adam_update", "project_back_update")
# The kernels have no derivative formulas: a call of one of these ops that autograd must record (as in
# `effective_weight()` on a weight that requires grad) goes to the reference, which keeps the graph.
_DIFFERENTIABLE = ("row_norm", "adapter_row_norm")
_BACKENDS = ("cpu", "cuda")


def _torch_release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def load():
    """The `_C` module, or None (see `load_error()`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            module = importlib.import_module("gradnormlorp_kernels._C")
        except ModuleNotFoundError:
            _error = (
                "gradnormlorp_kernels._C is not built (installed without a compiler, with "
                "GRADNORMLORP_NO_EXTENSION=1, or its build failed: reinstall with "
                "`pip install --no-build-isolation .` to see why)"
            )
        except Exception as exc:  # noqa: BLE001 (an .so built for another torch/CUDA fails with undefined symbols)
            _error = (
                f"gradnormlorp_kernels._C does not load with torch {torch.__version__}: {type(exc).__name__}: {exc}"
            )
        else:
            built_for = getattr(module, "torch_version", "unknown")
            if built_for != _torch_release(torch.__version__):
                _error = (
                    f"gradnormlorp_kernels._C was built for torch {built_for}, this is torch {torch.__version__}: "
                    "rebuild it with `pip install --no-build-isolation .`"
                )
            else:
                _module = module
    return _module


def load_error() -> str | None:
    load()
    return _error


def _graph_safe(kernel, reference):
    @functools.wraps(reference)
    def call(*args, **kwargs):
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())
        ):
            return reference(*args, **kwargs)
        return kernel(*args, **kwargs)

    return call


def _norm_optional(kernel):
    """The compiled project-back forms the row norms in its one pass over W anyway; `with_norm=False`
    only drops them from the result, as the op's contract says. It gates the direction and the decay with
    one gate, so a gated direction with decay takes the reference."""

    def call(weight, direction, left, right, step_size, decay, gate, with_norm=True, direction_gated=False):
        if direction_gated:
            if decay:
                from . import _dispatch

                return _dispatch._REFERENCE["project_back_update"](
                    weight, direction, left, right, step_size, decay, gate, with_norm, direction_gated)
            gate = torch.ones_like(gate)
        norms = kernel(weight, direction, left, right, step_size, decay, gate)
        return norms if with_norm else norms[:0]

    return call


@functools.cache
def _kernel(backend: str, op_name: str):
    module = load()
    if module is None:
        raise ImportError(_error)
    if backend == "cuda" and not module.has_cuda():
        raise ImportError("gradnormlorp_kernels._C was built without CUDA kernels")
    kernel = getattr(module, f"{backend}_{op_name}")
    if op_name == "project_back_update":
        return _norm_optional(kernel)
    if op_name not in _DIFFERENTIABLE:
        return kernel
    from . import _dispatch

    return _graph_safe(kernel, _dispatch._REFERENCE[op_name])


def __getattr__(name: str):
    backend, _, op_name = name.partition("_")
    if backend in _BACKENDS and op_name in _KERNELS:
        return _kernel(backend, op_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
