"""A refresh's k x k eigendecomposition on the host CPU, in a worker thread, while the GPU works.

On a GPU, `torch.linalg.eigh` of the sketch's Gram matrix (k = rank + oversampling) is cuSOLVER's chain of
latency-bound kernels (1.2 ms at k = 136 on an H200) that ends with a check on the host, so the step that
finished a refresh waited for both. LAPACK solves the same small problem on the host in about a
millisecond, and nothing needs the answer before the next step: the sketching step queues copies of the
Gram matrix and then of a "done" flag to pinned memory on its stream, a worker thread watches the flag and
solves, and the finishing step collects the vectors and copies them back on its stream.

The worker makes no CUDA call (it reads pinned memory the copy engine writes), so it cannot disturb a
stream capture in another thread. Every CUDA eigendecomposition up to `MAX_K` goes through it, also when no
job was started (a loaded state's pending sketch): the same LAPACK call on the same thread, so a resumed
run gets the same bits. Above `MAX_K` the host's cubic cost outgrows a step, and cuSOLVER solves it from a
worker of its own (`_device_eigh`).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

import torch

from .ops import refresh

# Largest k solved on the host: on the H200 machine's host k = 136 (rank 128) takes 1.1 ms on one thread,
# k = 264 about 4.5 ms.
MAX_K = 160
# How long the worker sleeps between looks at a job's flag, and how long it waits before giving up (the
# GPU work before the copy failed).
POLL_S = 50e-6
TIMEOUT_S = 600.0

_jobs: queue.SimpleQueue | None = None
_start_lock = threading.Lock()
_flag_sources: dict[torch.device, torch.Tensor] = {}


def _work(jobs: queue.SimpleQueue, ready: threading.Event) -> None:
    # LAPACK on this thread alone: waking a team of threads for a k ~ 136 problem a step apart costs more
    # than the team gives. (get_num_threads first: a thread's first use of it resets its count.)
    torch.get_num_threads()
    torch.set_num_threads(1)
    ready.set()
    while True:
        future, done, gram, healthy, out = jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not done.item():
                if time.monotonic() > deadline:
                    raise TimeoutError("the GPU did not deliver the sketch's Gram matrix")
                time.sleep(POLL_S)
            out.copy_(refresh.ritz_vectors(gram, healthy))
        except BaseException as exc:  # noqa: BLE001 (handed to whoever collects the job)
            future.set_exception(exc)
        else:
            future.set_result(out)


def _queue() -> queue.SimpleQueue:
    global _jobs
    with _start_lock:
        if _jobs is None:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            ready = threading.Event()
            threads = torch.get_num_threads()
            threading.Thread(target=_work, args=(jobs, ready), name="gradnormlorp-eigh", daemon=True).start()
            ready.wait()
            # torch.set_num_threads also sets the count that threads started later begin with: put back.
            torch.set_num_threads(threads)
            _jobs = jobs
        return _jobs


def on_host(gram: torch.Tensor) -> bool:
    """Whether the eigendecomposition of this Gram matrix runs on the host (a CUDA one of k <= MAX_K)."""
    return gram.is_cuda and gram.shape[-1] <= MAX_K


def start(gram: torch.Tensor, healthy: torch.Tensor) -> concurrent.futures.Future:
    """Begin `ops.refresh.ritz_vectors(gram, healthy)` of a CUDA Gram matrix on the host: its copies are
    queued on the current stream, the result (pinned host memory) is the future's. No host synchronisation."""
    device = gram.device
    if device not in _flag_sources:
        _flag_sources[device] = torch.ones((), dtype=torch.int32, device=device)
    # One pinned allocation (each costs the host tens of microseconds): the Gram matrix, the result, the
    # health flag and the done flag.
    matrix_bytes = gram.numel() * gram.element_size()
    buffer = torch.empty(2 * matrix_bytes + 8, dtype=torch.uint8, pin_memory=True)
    host_gram, out = (buffer[i * matrix_bytes:(i + 1) * matrix_bytes].view(gram.dtype).view(gram.shape)
                      for i in range(2))
    done = buffer[2 * matrix_bytes:2 * matrix_bytes + 4].view(torch.int32).view(())
    host_healthy = buffer[2 * matrix_bytes + 4:2 * matrix_bytes + 5].view(torch.bool).view(())
    done.zero_()
    host_gram.copy_(gram, non_blocking=True)
    host_healthy.copy_(healthy, non_blocking=True)
    done.copy_(_flag_sources[device], non_blocking=True)  # after the two above, in stream order
    return _enqueue(done, host_gram, host_healthy, out)


def _enqueue(done: torch.Tensor, gram: torch.Tensor, healthy: torch.Tensor, out: torch.Tensor) -> concurrent.futures.Future:
    """The worker's job: once the host tensor `done` holds nonzero, `out` = ritz_vectors(gram, healthy)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    _queue().put((future, done, gram, healthy, out))
    return future


def ritz_vectors(gram: torch.Tensor, healthy: torch.Tensor,
                 job: concurrent.futures.Future | None = None) -> torch.Tensor:
    """`ops.refresh.ritz_vectors(gram, healthy)`: from `job` (what `start` returned for them) when given,
    else solved now, on the host when `on_host(gram)` (then the result is in pinned host memory: copy it to
    the device without blocking)."""
    if job is None:
        if not on_host(gram):
            return refresh.ritz_vectors(gram, healthy)
        job = start(gram, healthy)
    return job.result()
