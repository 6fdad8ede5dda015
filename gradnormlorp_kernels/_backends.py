"""`backends()`: which implementations load on this machine, and which one each op uses."""

from __future__ import annotations

import importlib.util

import torch

from . import _dispatch, _extension


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "GPU kernels"
    if _dispatch.triton_interpreted():
        return True, "CPU, under TRITON_INTERPRET=1 (slow; for tests)"
    return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"


def backends() -> dict:
    """Availability and reasons per backend, and the backend each op runs on for CPU and CUDA tensors."""
    triton_ok, triton_why = _triton_status()
    ext = _extension.load()
    ext_error = _extension.load_error()
    cuda_ext = ext is not None and bool(getattr(ext, "has_cuda", lambda: False)())
    status = {
        "triton": {"available": triton_ok, "reason": triton_why},
        "cuda": {
            "available": cuda_ext and torch.cuda.is_available(),
            "reason": ext_error or ("compiled CUDA kernels" if cuda_ext else "extension built without CUDA"),
        },
        "cpu": {"available": ext is not None, "reason": ext_error or "compiled C++ kernels"},
        "reference": {"available": True, "reason": "pure PyTorch, always there"},
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    selected = {
        device: {name: _dispatch.select(name, device)[0] for name in _dispatch.registered_ops()} for device in devices
    }
    return {
        "preference": _dispatch.current_preference(),
        "backends": status,
        "ops": selected,
        "load_errors": _dispatch.load_errors(),
    }
