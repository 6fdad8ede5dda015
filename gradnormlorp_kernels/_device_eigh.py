"""A refresh's k x k eigendecomposition on the GPU, from a worker thread, for the Gram matrices that the host
worker (`_host_eigh`) does not take (k > `_host_eigh.MAX_K`).

cuSOLVER's `syevd` waits on the host inside the call, and `torch.linalg.eigh` then checks its status there
too. On an H200, queued behind 100 ms of GPU work, the call returned only once that work was done, and at
k = 520 the solve itself holds the calling thread for 6-8 ms. So the step that called it waited that long
before it could launch anything. Called from a worker thread on a stream of its own, that wait is the
worker's: the step that starts the job goes on, and the step that finishes the refresh (some steps later:
`optimizer.DEVICE_SOLVE_LAG`) takes vectors that are usually ready.

The worker's synchronisations are CUDA calls. During another thread's stream capture they are allowed only
when that capture runs in "thread_local" mode, which is what the optimizer's captures (and torch.compile's)
use, and no job is started while the current stream is being captured. A capture in CUDA's default "global"
mode (`torch.cuda.graph` without `capture_error_mode`) that begins while a solve is in flight is invalidated
(measured on an H200): code that captures that way beside training sets $GRADNORMLORP_EIGH_WORKER=0. A solve
that failed on the worker is run again by the step that collects it.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

from . import _host_eigh
from .ops import refresh

_ENV_VAR = "GRADNORMLORP_EIGH_WORKER"
_start_lock = threading.Lock()
_worker: concurrent.futures.ThreadPoolExecutor | None = None


def enabled() -> bool:
    """False when $GRADNORMLORP_EIGH_WORKER is 0: these solves then run on the thread that steps, as
    `torch.linalg.eigh` (with its wait), and finish HOST_SOLVE_LAG steps after their sketch."""
    value = os.environ.get(_ENV_VAR, "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{_ENV_VAR} must be 0 or 1, got {value!r}")
    return value == "1"


def takes_size(k: int, device: torch.device) -> bool:
    """Whether a k x k Gram matrix on `device` is solved here: on a GPU, larger than the host worker takes."""
    return device.type == "cuda" and k > _host_eigh.MAX_K and enabled()


def takes(gram: torch.Tensor) -> bool:
    """`takes_size` for this Gram matrix."""
    return takes_size(gram.shape[-1], gram.device)


def solve(gram: torch.Tensor, healthy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`ops.refresh.ritz_vectors(gram, healthy)`, healthy) on the current stream, blocking the calling thread.
    A solve that cuSOLVER reports as failed gives zero vectors and healthy False, so the caller keeps its
    projector, as it does for a broken sketch."""
    try:
        return refresh.ritz_vectors(gram, healthy), healthy
    except torch.linalg.LinAlgError:
        return torch.zeros_like(gram), torch.zeros_like(healthy)


class Job:
    """A solve queued on the worker; `collect()` hands its result to the current stream."""

    def __init__(self, future: concurrent.futures.Future, gram: torch.Tensor, healthy: torch.Tensor) -> None:
        self._future, self._gram, self._healthy = future, gram, healthy

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`solve`'s (vectors, healthy), after the worker has queued it (the host waits only if it has not);
        the current stream waits for the solve's kernels. If the worker's call failed, the solve runs again
        here, on the current stream: the same routine on the same matrix, so the same bits."""
        try:
            vectors, healthy, done = self._future.result()
        except RuntimeError:  # e.g. another thread's capture in "global" mode forbade the worker's synchronisations
            return solve(self._gram, self._healthy)
        stream = torch.cuda.current_stream(vectors.device)
        stream.wait_event(done)
        vectors.record_stream(stream)
        healthy.record_stream(stream)
        return vectors, healthy


def _run(gram: torch.Tensor, healthy: torch.Tensor, stream: torch.cuda.Stream):
    with torch.cuda.device(gram.device), torch.cuda.stream(stream):
        vectors, healthy = solve(gram, healthy)
        done = torch.cuda.Event()
        done.record(stream)
    return vectors, healthy, done


def start(gram: torch.Tensor, healthy: torch.Tensor, stream: torch.cuda.Stream) -> Job:
    """`solve(gram, healthy)` on the worker, on `stream`, ordered after the current stream's work; returns at once."""
    global _worker
    if not takes(gram):
        raise ValueError(f"gram must be a CUDA tensor larger than {_host_eigh.MAX_K} x {_host_eigh.MAX_K} "
                         f"(smaller ones go to the host worker), got shape {tuple(gram.shape)} on {gram.device}")
    with _start_lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradnormlorp-cusolver")
    # Ordered here, on this thread, so that the worker's kernels follow what the current stream has queued.
    stream.wait_stream(torch.cuda.current_stream(gram.device))
    gram.record_stream(stream)
    healthy.record_stream(stream)
    return Job(_worker.submit(_run, gram, healthy, stream), gram, healthy)
