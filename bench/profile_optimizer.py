"""Where an optimizer step on the LLaMA-1B-shaped weights of the optimizer benchmark spends its time:
GPU kernels (torch.profiler) and the host side alone (wall time of `step()` while the GPU is kept busy,
and cProfile's functions by own time).

    python bench/profile_optimizer.py [--rank 128] [--rows 25] [--host-parts]

--host-parts: instead, the host time of each part of a graphed step before and including its replay (the
part the benchmark's step time holds before the GPU starts), with the GPU kept busy.
"""

import argparse
import functools
import time

import torch

from profiling import profile_call

from gradnormlorp_kernels import GradNormLoRPAdamW, _step_graph
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--host-parts", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02)
              for shape in weight_shapes(SIZES["full"])]
    grads = [torch.randn_like(p) for p in params]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=args.rank,
                                  update_proj_gap=10**6, scale=0.25, state_bits=8)

    def set_grads() -> None:
        for p, g in zip(params, grads):
            p.grad = g

    def step() -> None:
        set_grads()
        optimizer.step()

    if args.host_parts:
        report_host_parts(optimizer, step, set_grads)
    else:
        profile_call(step, "step", args.rows)


def report_host_parts(optimizer, step, set_grads, steps: int = 50) -> None:
    """Median host microseconds of each timed part per step (the optimizer's own methods wrapped on the
    instance, the graph replay on its class; "step up to its replay": from `optimizer.step()`'s call to the
    replay's), while a sleep kernel keeps the GPU busy. The gradients are set outside the timed step."""
    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - start)
        return wrapper

    for name in ("_graph_states", "_flat_moments", "_graph_key", "_projector_addresses", "_advance_graphed",
                 "_step_group_graphed"):
        setattr(optimizer, name, timed(name, getattr(optimizer, name)))
    step_started = [0.0]
    replay = _step_graph.StepGraph.replay

    def replay_marked(self, lr):
        spent.setdefault("step up to its replay", []).append(time.perf_counter() - step_started[0])
        replay(self, lr)

    _step_graph.StepGraph.replay = timed("StepGraph.replay", replay_marked)
    torch.cuda.CUDAGraph.replay = timed("CUDAGraph.replay", torch.cuda.CUDAGraph.replay)

    def marked_step():
        step_started[0] = time.perf_counter()
        optimizer.step()

    timed_step = timed("optimizer.step", marked_step)
    for _ in range(5):
        step()
    spent.clear()
    for _ in range(steps):
        set_grads()
        torch.cuda._sleep(50_000_000)
        timed_step()
        torch.cuda.synchronize()
    for name, times in spent.items():
        calls = max(1, len(times) // steps)
        per_step = sorted(sum(times[i * calls:(i + 1) * calls]) for i in range(steps))
        print(f"{name:24} median {1e6 * per_step[len(per_step) // 2]:8.1f} us per step ({calls} calls)")


if __name__ == "__main__":
    main()
