"""What the profile_* scripts in this folder share: warm up a GPU call, print torch.profiler's kernel table,
then its host time apart from the GPU's."""

import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile


def profile_call(step, label: str, rows: int, warmup: int = 5, calls: int = 5) -> None:
    """Kernel time by kernel over `calls` calls after `warmup`, then `report_host_time`."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    report_host_time(step, label, rows)


def report_host_time(step, label: str, rows: int, repeats: int = 10, calls_profiled: int = 5,
                     sleep_cycles: int = 200_000_000) -> None:
    """Wall time of `step()` while a long sleep kernel keeps the GPU busy (so no launch waits on it), then
    cProfile's functions by own time over `calls_profiled` calls."""
    torch.cuda.synchronize()
    host = []
    for _ in range(repeats):
        torch.cuda._sleep(sleep_cycles)
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    host.sort()
    print(f"host time per {label}: median {1e3 * host[len(host) // 2]:.3f} ms, min {1e3 * host[0]:.3f} ms")
    profiler = cProfile.Profile()
    torch.cuda._sleep(sleep_cycles * calls_profiled)
    profiler.enable()
    for _ in range(calls_profiled):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
