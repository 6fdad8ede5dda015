"""What a subspace refresh costs on the GPU, and which of its pieces synchronise with the host; then the
optimizer benchmark's window step by step, each step labelled with what it did (a refresh's sketch begun,
a later part of a spread sketch, a refresh's finish, a graph capture).

    python bench/profile_refresh.py [--rank 128] [--window-only] [--trace]

`--trace` then steps on past the window to the next step of each kind and prints their kernels per CUDA
stream (start, duration), to show what overlaps the step's replay and what waits.
"""

import argparse
import statistics
import time

import torch
import triton.testing

from gradnormlorp_kernels import GradNormLoRPAdamW, ops
from gradnormlorp_kernels.benchmarks import _timing
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes
from gradnormlorp_kernels.optimizer import OVERSAMPLE, POWER_ITERS


def wall_ms(fn, repeats: int = 7) -> float:
    """Median wall time of one call from an idle GPU to its end: what a refresh step pays."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def synchronises(fn) -> str:
    """'no' when `fn` runs under sync debug mode "error", else the start of the error."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no"
    except RuntimeError as exc:
        return "YES: " + str(exc).splitlines()[0][:90]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def with_magma(fn):
    torch.backends.cuda.preferred_linalg_library("magma")
    try:
        return fn()
    finally:
        torch.backends.cuda.preferred_linalg_library("default")


def pieces(rows: int, k: int) -> None:
    y32 = torch.randn(rows, k, device="cuda")
    y64 = y32.double()
    gram64 = y64.T @ y64
    gram32 = y32.T @ y32
    gram_cpu = gram64.cpu()
    generator = torch.Generator(device="cuda")
    candidates = {
        "linalg.qr fp32": lambda: torch.linalg.qr(y32),
        "linalg.qr fp64": lambda: torch.linalg.qr(y64),
        "cholesky_ex fp32 (k x k)": lambda: torch.linalg.cholesky_ex(gram32),
        "cholesky_ex fp64 (k x k)": lambda: torch.linalg.cholesky_ex(gram64),
        "solve_triangular fp64": lambda: torch.linalg.solve_triangular(gram64.triu(), y64, upper=True, left=False),
        "eigh fp32 (k x k)": lambda: torch.linalg.eigh(gram32),
        "eigh fp64 (k x k)": lambda: torch.linalg.eigh(gram64),
        "eigh fp64 (k x k), MAGMA": lambda: with_magma(lambda: torch.linalg.eigh(gram64)),
        "eigh on the CPU incl. copies": lambda: torch.linalg.eigh(gram64.cpu())[1].cuda(),
        "eigh CPU only": lambda: torch.linalg.eigh(gram_cpu),
        "svd fp32 (k x k)": lambda: torch.linalg.svd(gram32),
        "seeded randn": lambda: torch.randn(rows, k, device="cuda", generator=generator.manual_seed(3)),
        "orthonormalize": lambda: ops.orthonormalize(y32),
    }
    for name, fn in candidates.items():
        gpu_us = 1e3 * triton.testing.do_bench(fn, warmup=5, rep=30)
        print(f"  {rows}x{k} {name:32s} do_bench {gpu_us:8.1f} us  wall {1e3 * wall_ms(fn):8.1f} us  "
              f"syncs: {synchronises(fn)}")


def projectors(rank: int) -> None:
    for shape, side in (((2048, 5461), "left"), ((5461, 2048), "right"), ((2048, 2048), "left")):
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        fn = lambda: ops.randomized_projector(grad, rank, side, OVERSAMPLE, POWER_ITERS, 11)  # noqa: E731
        print(f"  randomized_projector {shape} {side} r={rank}: wall {wall_ms(fn):.2f} ms, "
              f"syncs: {synchronises(fn)}")


def _captured_sketch_parts(optimizer) -> int:
    return sum(g is not None for slots in optimizer._sketch_graphs.values() for slot in slots for g in slot.graphs)


def _refresh_phases(optimizer) -> tuple[int, int, int]:
    """(refreshes begun so far, sketches in progress, refreshes this step will finish), read before a step."""
    states = [s for s in optimizer.state.values() if "calls" in s]
    return (sum(s["refreshes"] for s in states), len(optimizer._sketching),
            sum(optimizer._finishing(s) for s in states))


def _label(before: tuple, after: tuple) -> list[str]:
    what = []
    if before[2]:
        what.append("finish")
    if before[1]:
        what.append("part")
    if after[0] > before[0]:
        what.append("sketch")
    return what


def window(rank: int):
    """The optimizer benchmark's window, step by step, with what each step did."""
    size = SIZES["full"]
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in weight_shapes(size)]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=rank,
                                  update_proj_gap=size.gap, scale=0.25, state_bits=8)

    def fresh() -> None:
        for p in params:
            p.grad = None
        for p in params:
            p.grad = torch.randn_like(p)

    labelled = []
    for _ in range(size.gap + 1):
        fresh()
        phases = _refresh_phases(optimizer)
        captures = sum(g.captures for g in optimizer._graphs.values())
        sketch_parts = _captured_sketch_parts(optimizer)
        ms = _timing.time_once(optimizer.step, device)
        what = _label(phases, _refresh_phases(optimizer))
        if sum(g.captures for g in optimizer._graphs.values()) > captures:
            what.append("capture")
        if _captured_sketch_parts(optimizer) > sketch_parts:
            what.append("sketch-capture")
        labelled.append((ms, "+".join(what) or "plain"))
    steps = labelled[1:]
    slowest = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:8]
    print("  slowest steps: " + ", ".join(f"#{i + 1} {steps[i][0]:.2f} ms {steps[i][1]}" for i in slowest))
    print(f"  first step {labelled[0][0]:.2f} ms")
    for kind in sorted({what for _, what in steps}):
        times = sorted(ms for ms, what in steps if what == kind)
        if times:
            print(f"  {kind:16s} n={len(times):3d} median {statistics.median(times):7.2f} ms  max {times[-1]:7.2f} ms")
    print(f"  window: median {statistics.median(m for m, _ in steps):.2f} ms, mean {statistics.fmean(m for m, _ in steps):.2f}"
          f" ms, max {max(m for m, _ in steps):.2f} ms")
    return optimizer, fresh


def trace(optimizer, fresh, steps: int = 40) -> None:
    """The next step of each kind (sketch, part, finish) after the window, kernels by stream."""
    from torch.profiler import ProfilerActivity, profile

    shown = set()
    for _ in range(steps):
        fresh()
        phases = _refresh_phases(optimizer)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            ms = _timing.time_once(optimizer.step, torch.device("cuda"))
        kind = "+".join(_label(phases, _refresh_phases(optimizer)))
        if not kind or kind in shown:
            continue
        shown.add(kind)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        start = min(e.time_range.start for e in kernels)
        print(f"  {kind} step {ms:.2f} ms: {len(kernels)} GPU events")
        for e in sorted(kernels, key=lambda e: e.time_range.start):
            print(f"    stream {e.device_resource_id:>3} +{e.time_range.start - start:8.1f} us "
                  f"{e.time_range.elapsed_us():8.1f} us  {e.name[:70]}")
        syncs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and
                 any(w in e.name for w in ("Synchronize", "item", "local_scalar", "eigh", "cudaMemcpy"))]
        for e in syncs[:20]:
            print(f"    host {e.name[:50]:50s} {e.time_range.elapsed_us():8.1f} us")
        if len(shown) == 3:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--window-only", action="store_true", help="only the optimizer window")
    parser.add_argument("--trace", action="store_true", help="then trace a sketch step and a finish step")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if not args.window_only:
        k = args.rank + OVERSAMPLE
        for rows in (5461, 2048):
            pieces(rows, k)
        projectors(args.rank)
    optimizer, fresh = window(args.rank)
    if args.trace:
        trace(optimizer, fresh)


if __name__ == "__main__":
    main()
