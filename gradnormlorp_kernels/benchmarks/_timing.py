"""Timing helpers: `triton.testing.do_bench` on a GPU, a warmed-up timer loop on the CPU."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

# Quantiles reported next to the median (as do_bench's `quantiles`).
LOW_QUANTILE = 0.2
HIGH_QUANTILE = 0.8
# The CPU fallback's fewest timed calls: CPU runs check the pipeline, they are not the measurement.
CPU_MIN_REPEATS = 3
# Warm-up and measurement time (ms) per problem size; "tiny" (tests) takes the fewest calls.
WINDOWS_MS = {"full": (25.0, 100.0), "cpu": (25.0, 100.0), "tiny": (0.0, 0.0)}


def windows(sizes: str) -> dict:
    warmup_ms, rep_ms = WINDOWS_MS[sizes]
    return {"warmup_ms": warmup_ms, "rep_ms": rep_ms}


@dataclass
class Timing:
    median_ms: float
    low_ms: float
    high_ms: float


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name: the first part of every result's key."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def quantile(sorted_values: list[float], q: float) -> float:
    index = q * (len(sorted_values) - 1)
    low = int(index)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (index - low)


def time_repeated(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Optional[list[torch.Tensor]] = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> Timing:
    """Median and quantiles of `fn`'s run time, gradients of `grad_to_none` cleared before each call
    (so no call pays for accumulating into the previous call's gradient)."""
    grad_to_none = list(grad_to_none or [])
    if device.type == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
            quantiles=[0.5, LOW_QUANTILE, HIGH_QUANTILE],
        )
        return Timing(float(median), float(low), float(high))
    # do_bench needs a GPU driver; on the CPU: warm up for `warmup_ms` (at least one call), then time
    # enough calls to fill `rep_ms` (at least CPU_MIN_REPEATS) one by one.
    samples: list[float] = []
    deadline = time.perf_counter() + warmup_ms / 1e3
    while not samples or time.perf_counter() < deadline:
        clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    estimate = statistics.median(samples)
    repeats = max(CPU_MIN_REPEATS, int(rep_ms / max(estimate, 1e-3)))
    samples = []
    for _ in range(repeats):
        clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return Timing(statistics.median(samples), quantile(samples, LOW_QUANTILE), quantile(samples, HIGH_QUANTILE))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, from an idle device to its last kernel (CUDA events; host clock on the CPU).

    For calls that change state (an optimizer step), where repeating the same call is not the same work.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    start_time = time.perf_counter()
    fn()
    return (time.perf_counter() - start_time) * 1e3


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor]) -> Optional[int]:
    """Peak memory allocated during `fn` above what was allocated before it (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    clear_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def kernel_ms(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor], calls: int = 5
              ) -> Optional[float]:
    """The GPU kernels' own time per call of `fn` (torch.profiler), without the gaps between them: where a
    method's median is above it, the host's launches are what the median timed (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            clear_grads(grad_to_none)
            fn()
        torch.cuda.synchronize(device)
    kernels_us = sum(event.device_time_total for event in trace.events()
                     if event.device_type == torch.autograd.DeviceType.CUDA)
    return kernels_us / calls / 1e3


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# L2 flush between graphed calls (an H100 has 50 MiB of L2, an H200 60). It reads the buffer, where do_bench's
# zero_ writes it: written, the L2 is left full of dirty lines that the timed kernel then writes back to memory,
# up to the L2's size of writes that are not its own. On the H200 that cost a 90 MB row_norm 6 us of 30
# (23.8 us read-flushed, as ncu's 24.5), and nothing to kernels not bound by memory.
FLUSH_BYTES = 256 << 20


def _l2_flush(device: torch.device) -> Callable[[], None]:
    """A flush of the L2 that leaves it holding clean lines of a buffer no kernel under test touches."""
    buffer = torch.ones(FLUSH_BYTES, dtype=torch.int8, device=device)
    total = torch.empty((), dtype=torch.int64, device=device)
    return lambda: torch.sum(buffer, 0, dtype=torch.int64, out=total)


def _capture(body: Callable[[], object]) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # library handles and workspaces are created outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        body()
    return graph


def time_kernels(fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 9,
                 **cpu_window) -> Timing:
    """The GPU time of `fn`'s kernels alone: `calls` calls replayed from one CUDA graph, each after an L2
    flush, minus a graph of the flushes alone; median and quantiles over `rounds` replays.

    For memory-bound kernels of tens of microseconds, where `do_bench` on a host that takes 30-100 us a
    launch (the lent H100's) times the host instead of the kernel. Off the GPU: `time_repeated` with
    `cpu_window`. Raises RuntimeError when `fn` cannot be captured (it synchronises)."""
    if device.type != "cuda":
        return time_repeated(fn, device, **cpu_window)
    flush = _l2_flush(device)

    def flushed_calls() -> None:
        for _ in range(calls):
            flush()
            fn()

    def flushes() -> None:
        for _ in range(calls):
            flush()

    graphs = [_capture(flushed_calls), _capture(flushes)]
    samples: list[list[float]] = [[], []]
    for _ in range(rounds):
        for graph, times in zip(graphs, samples):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    flush_ms = statistics.median(samples[1])
    per_call = sorted((t - flush_ms) / calls for t in samples[0])
    return Timing(statistics.median(per_call), quantile(per_call, LOW_QUANTILE), quantile(per_call, HIGH_QUANTILE))
