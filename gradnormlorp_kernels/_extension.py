"""The compiled extension `gradnormlorp_kernels._C`, if it was built and loads against this torch.

Import never fails because of it: `load_error()` says why it is absent, and the ops fall back.
"""

from __future__ import annotations

import importlib

_module = None
_error: str | None = None


def load():
    """The `_C` module, or None (see `load_error()`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("gradnormlorp_kernels._C")
        except Exception as exc:  # missing .so, or one built for another torch/CUDA
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def load_error() -> str | None:
    load()
    return _error
