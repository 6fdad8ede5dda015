"""Host time of the optimizer's graphed step on the benchmark's 28 LLaMA-1B-shaped matrices (8-bit moments):
from `step()` to the replay call, and the whole call, median over many steps.

On a GPU the replay is real and a sleep kernel keeps the GPU busy, so nothing waits on it. Off the GPU
the matrices are 64x smaller CPU tensors at rank 8 (on a GPU: full size, rank 128) and the CUDA calls of the
graphed path are mocked (`is_cuda`, streams, events, the replay): the host's Python alone, on a quieter
machine than the lent GPU hosts.

    python bench/time_host_step.py [--steps 3000]
"""

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from gradnormlorp_kernels import GradNormLoRPAdamW, _step_graph
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes


class _NoCuda:
    """Stands in for a stream or an event."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def wait_stream(self, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shrink = 1 if cuda else 64
    params = [torch.nn.Parameter(torch.randn(rows // shrink, cols // shrink, dtype=torch.bfloat16, device=device))
              for rows, cols in weight_shapes(SIZES["full"])]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=128 if cuda else 8,
                                  update_proj_gap=10**6, scale=0.25, state_bits=8)
    grads = [torch.randn_like(p) for p in params]
    replays: list[float] = []
    replay = _step_graph.StepGraph.replay

    def marked_replay(self, lr):
        replays.append(time.perf_counter())
        if cuda:
            replay(self, lr)

    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()  # the first step (eager, unmocked): states and projectors
    with contextlib.ExitStack() as patches:
        if not cuda:
            patches.enter_context(mock.patch.object(torch.Tensor, "is_cuda", new=property(lambda self: True)))
            patches.enter_context(mock.patch("torch.cuda.is_current_stream_capturing", lambda: False))
            patches.enter_context(mock.patch("torch.cuda.current_stream", lambda *args: _NoCuda()))
            patches.enter_context(mock.patch("torch.cuda.Event", _NoCuda))
            patches.enter_context(mock.patch.object(_step_graph.GroupGraphs, "run",
                                                    lambda self, key, step, dev, lr: marked_replay(None, lr)))
        patches.enter_context(mock.patch.object(_step_graph.StepGraph, "replay", marked_replay))
        to_replay, whole = [], []
        for _ in range(args.steps):
            for p, g in zip(params, grads):
                p.grad = g
            if cuda:
                torch.cuda._sleep(20_000_000)
            replays.clear()
            start = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            if replays:  # steps that captured a graph have no replay to time
                to_replay.append(replays[0] - start)
                whole.append(end - start)
            if cuda:
                torch.cuda.synchronize()
    print(f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU, CUDA mocked'}: step -> replay "
          f"{1e6 * statistics.median(to_replay):.1f} us, whole step {1e6 * statistics.median(whole):.1f} us "
          f"(median of {len(whole)} steps)")


if __name__ == "__main__":
    main()
