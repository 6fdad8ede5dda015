"""One op, several implementations: the registry that picks one at call time.

Every op is declared once with its pure-PyTorch reference (`@op`), which also registers it as a
`torch.library` custom op (`torch.ops.gradnormlorp.<name>`) so that `torch.compile` and `opcheck`
see it. Other backends add implementations by module path; they are imported on first use, so a
missing or broken backend costs nothing until it is asked for and then falls back to the reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
_PREFERENCES = ("auto",) + BACKENDS
_ENV_VAR = "GRADNORMLORP_BACKEND"

_REFERENCE: dict[str, Callable] = {}
_LAZY: dict[str, dict[str, tuple[str, str]]] = {}
_LOADED: dict[tuple[str, str], Callable | None] = {}
_LOAD_ERRORS: dict[str, str] = {}
_preference: list[str] = []


def _check_preference(name: str) -> str:
    if name not in _PREFERENCES:
        raise ValueError(f"backend must be one of {_PREFERENCES}, got {name!r}")
    return name


def current_preference() -> str:
    """The backend asked for: `use_backend` wins over $GRADNORMLORP_BACKEND, default "auto"."""
    if _preference:
        return _preference[-1]
    return _check_preference(os.environ.get(_ENV_VAR, "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend `name` where it implements them (else the reference)."""
    _preference.append(_check_preference(name))
    try:
        yield
    finally:
        _preference.pop()


@functools.cache
def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter: Triton decides when a kernel is defined, so the first
    answer holds for the process (and costs no environment lookup on every launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_backend(op_name: str, backend: str, module: str, attribute: str) -> None:
    """Declare that `module.attribute` implements `op_name` for `backend` (imported on first use)."""
    if backend not in BACKENDS[:-1]:
        raise ValueError(f"backend must be one of {BACKENDS[:-1]}, got {backend!r}")
    _LAZY.setdefault(op_name, {})[backend] = (module, attribute)


def _load(op_name: str, backend: str) -> Callable | None:
    key = (op_name, backend)
    if key not in _LOADED:
        module, attribute = _LAZY.get(op_name, {}).get(backend, (None, None))
        impl = None
        if module is not None:
            try:
                impl = getattr(importlib.import_module(module), attribute)
            except Exception as exc:  # a backend that cannot load must not break the op
                _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
        _LOADED[key] = impl
    return _LOADED[key]


def _device_allows(backend: str, device_type: str) -> bool:
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "cpu":
        return device_type == "cpu"
    return True


def select(op_name: str, device_type: str) -> tuple[str, Callable]:
    """The backend that runs `op_name` on `device_type` now, and its implementation."""
    preference = current_preference()
    if preference == "auto":
        order = ("triton", "cuda") if device_type == "cuda" else ("cpu",)
    elif preference == "reference":
        order = ()
    else:
        order = (preference,)
    for backend in order:
        if _device_allows(backend, device_type):
            impl = _load(op_name, backend)
            if impl is not None:
                return backend, impl
    return "reference", _REFERENCE[op_name]


def _first_device_type(args) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def op(name: str, *, mutates_args: tuple[str, ...] = ()):
    """Declare op `name` with its reference implementation (the decorated function).

    Returns a callable that dispatches to the selected backend. Outside `torch.compile` it calls the
    implementation directly (the custom-op dispatcher costs tens of microseconds a call on the hot
    path); under compilation it goes through `torch.ops.gradnormlorp.<name>` so the graph sees the op.
    """

    def decorate(reference: Callable) -> Callable:
        _REFERENCE[name] = reference

        @functools.wraps(reference)
        def run(*args, **kwargs):
            return select(name, _first_device_type(args))[1](*args, **kwargs)

        custom = torch.library.custom_op(f"gradnormlorp::{name}", run, mutates_args=mutates_args)

        @functools.wraps(reference)
        def entry(*args, **kwargs):
            if torch.compiler.is_compiling():
                return custom(*args, **kwargs)
            return run(*args, **kwargs)

        entry.custom_op = custom
        entry.reference = reference
        entry.op_name = name
        return entry

    return decorate


def registered_ops() -> list[str]:
    return sorted(_REFERENCE)


def implementations(op_name: str) -> list[str]:
    """Backends that have an implementation of `op_name` that loads here."""
    found = [b for b in BACKENDS[:-1] if _load(op_name, b) is not None]
    return found + ["reference"]


def load_errors() -> dict[str, str]:
    return dict(_LOAD_ERRORS)
