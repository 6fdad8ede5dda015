"""Host time of a GPU call, apart from the GPU's: the shared part of the profile_* scripts in this folder."""

import cProfile
import pstats
import time

import torch


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
