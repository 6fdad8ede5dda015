"""The optimizer's project-back at LLaMA-1B shapes, bf16, one-sided: the op without decay (cuBLAS, or the one-sided
Triton kernel where rows are not 16-byte aligned), cuBLAS's addmm alone, the op with decay (the one-sided kernel on
every weight), and the one-sided kernel's candidate tiles; kernel time from CUDA graphs (`time_kernels`), in us and
% of the weight's read + write at the copy bandwidth given.

    python bench/time_project_back.py [--copy-gbs 3001]
"""

import argparse

import torch

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton import project_back as kernel

CASES = [((2048, 2048), "right"), ((5461, 2048), "right"), ((2048, 5461), "left")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gbs", type=float, default=3001.0)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda")
    for (rows, cols), side in CASES:
        weight = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
        basis = torch.linalg.qr(torch.randn(rows if side == "left" else cols, args.rank, device=device)).Q.bfloat16()
        left, right = (basis, None) if side == "left" else (None, basis)
        direction = torch.randn((args.rank, cols) if side == "left" else (rows, args.rank), device=device)
        gate = torch.full((), 1e-3, device=device)
        gated = (direction * gate).bfloat16()
        runs = {
            "op": lambda: ops.project_back_update(weight, direction, left, right, 1e-3, 0.0, gate, False),
            "op, gated direction": lambda: ops.project_back_update(weight, gated, left, right, 1e-3, 0.0, gate, False,
                                                                   True),
            "cuBLAS addmm alone": (lambda: weight.addmm_(left, gated, alpha=-1e-3)) if side == "left" else
            (lambda: weight.addmm_(gated, right.T, alpha=-1e-3)),
            # A decay (its factor read on the device) takes the one-sided Triton kernel on every weight.
            "op with decay": lambda: ops.project_back_update(weight, gated, left, right, 1e-3, 1e-30, gate, False,
                                                             True),
        }
        if weight.stride(0) * weight.element_size() % 16:
            for tile, warps in [((128, 128, 64), 8), ((64, 128, 64), 4), ((128, 64, 64), 4), ((64, 64, 64), 4),
                                ((128, 256, 32), 8), ((256, 128, 32), 8)]:
                def configured(tile=tile, warps=warps):
                    saved = kernel._ONE_SIDED_TILE, kernel._ONE_SIDED_WARPS
                    kernel._ONE_SIDED_TILE, kernel._ONE_SIDED_WARPS = tile, warps
                    try:
                        ops.project_back_update(weight, gated, left, right, 1e-3, 0.0, gate, False, True)
                    finally:
                        kernel._ONE_SIDED_TILE, kernel._ONE_SIDED_WARPS = saved
                runs[f"  tile {tile} w{warps}"] = configured
        moved = 2 * weight.numel() * weight.element_size()
        for name, fn in runs.items():
            us = 1e3 * time_kernels(fn, device).median_ms
            print(f"{rows}x{cols} {side:5} r={args.rank} {name:22} {us:7.1f} us  "
                  f"{100 * moved / us / 1e3 / args.copy_gbs:5.1f}% of copy")


if __name__ == "__main__":
    main()
