"""Where an optimizer step on the LLaMA-1B-shaped weights of the optimizer benchmark spends its time:
GPU kernels (torch.profiler) and the host side alone (wall time of `step()` while the GPU is kept busy,
and cProfile's functions by own time).

    python bench/profile_optimizer.py [--rank 128] [--rows 25]
"""

import argparse

import torch

from profiling import profile_call

from gradnormlorp_kernels import GradNormLoRPAdamW
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02)
              for shape in weight_shapes(SIZES["full"])]
    grads = [torch.randn_like(p) for p in params]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=args.rank,
                                  update_proj_gap=10**6, scale=0.25, state_bits=8)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    profile_call(step, "step", args.rows)


if __name__ == "__main__":
    main()
