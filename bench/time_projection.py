"""The optimizer's gradient projection, bf16: torch.matmul (cuBLAS) against the split-K Triton `project_grad`,
kernel time from CUDA graphs (`time_kernels`), in us and GB/s (bytes = gradient + projector + output). LLaMA-1B's down projection
(2048 x 5461, rows not 16-byte aligned) is where cuBLAS falls back to a slow kernel.

    python bench/time_projection.py [--configs]    # --configs: also every candidate tile of the kernel
"""

import sys

import torch

from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton import project_grad as kernel

CASES = [((2048, 5461), "left"), ((2048, 2048), "left"), ((5461, 2048), "right")]


def main() -> None:
    for (rows, cols), side in CASES:
        for rank in (128, 512):
            grad = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            proj = torch.linalg.qr(torch.randn(rows if side == "left" else cols, rank, device="cuda")).Q.bfloat16()
            left, right = (proj, None) if side == "left" else (None, proj)
            out = kernel.project_grad(grad, left, right)
            moved = (grad.numel() + proj.numel() + out.numel()) * grad.element_size()
            runs = {"torch.matmul": (lambda: proj.T @ grad) if side == "left" else (lambda: grad @ proj),
                    "project_grad": lambda: kernel.project_grad(grad, left, right)}
            if "--configs" in sys.argv:
                for c in kernel.CONFIGS:
                    name = "  tile " + " ".join(f"{v}" for v in c.kwargs.values()) + f" w{c.num_warps} s{c.num_stages}"
                    runs[name] = lambda c=c: kernel.project_grad(grad, left, right, config=c)
            for name, fn in runs.items():
                us = 1e3 * time_kernels(fn, grad.device).median_ms
                print(f"{rows}x{cols} {side:5} r={rank:3}  {name:28} {us:7.1f} us  {moved / us / 1e3:6.0f} GB/s")


if __name__ == "__main__":
    main()
