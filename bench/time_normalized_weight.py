"""The layer's weight kernels: the forward's W = diag(M / n)(W0 + s B A) with n and W' A^T (`adapter_weight`:
adapter_row_norm's sweep, A A^T, then `_normalized_weight_kernel`), the norm sweep alone, the backward's
rebuild from a known row scale, and full mode's diag(c) V, at each candidate weight-pass tile (BLOCK_M,
BLOCK_N, warps, stages); kernel time from CUDA graphs (`time_kernels`), in us and % of the byte floor (W0 read
once, W written once; the norm sweep: W0 read once) at the copy bandwidth.

    python bench/time_normalized_weight.py [--copy-gbs 4243] [--configs] [--shapes 2] [--ranks 64 32]
"""

import argparse
import itertools

import torch

from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton import linear, row_norm

SHAPES = [(4096, 4096, 16), (11008, 4096, 16), (4096, 4096, 64), (4096, 4096, 32)]
CANDIDATES = list(itertools.product((16, 32), (128, 256, 512), (4, 8), (2, 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gbs", type=float, default=4243.0)
    parser.add_argument("--configs", action="store_true", help="time every candidate, not only the default")
    parser.add_argument("--shapes", type=int, default=None, help="the first N shapes (with --configs: 1)")
    parser.add_argument("--ranks", type=int, nargs="+", help="the shapes of these ranks instead")
    args = parser.parse_args()
    device = torch.device("cuda")
    shapes = [s for s in SHAPES if s[2] in args.ranks] if args.ranks else \
        SHAPES[:args.shapes or (1 if args.configs else len(SHAPES))]
    for rows, cols, rank in shapes:
        base = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_A = torch.randn(rank, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_B = torch.randn(rows, rank, device=device, dtype=torch.bfloat16) * 0.05
        magnitude = (torch.rand(rows, device=device) + 0.5).bfloat16()
        row_scale = torch.rand(rows, device=device) + 0.5
        moved = 2 * base.numel() * base.element_size()
        for config in CANDIDATES if args.configs else [None]:
            runs = {
                "adapter_weight": lambda: linear._normalized_weight_launch(
                    base, lora_A, lora_B, magnitude, None, 2.0, base.dtype, config),
                "norm_sweep": lambda: row_norm.adapter_row_norm_partials(base, lora_A, lora_B, 2.0, rank <= 64),
                "rebuild": lambda: linear._normalized_weight_launch(
                    base, lora_A, lora_B, None, row_scale, 2.0, base.dtype, config),
                "full": lambda: linear._normalized_weight_launch(
                    base, None, None, None, row_scale, 0.0, base.dtype, config),
            }
            label = "default" if config is None else "m{} n{} w{} s{}".format(*config)
            for name, fn in runs.items():
                if config is not None and name == "norm_sweep":
                    continue
                try:
                    us = 1e3 * time_kernels(fn, device).median_ms
                except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                    print(f"{rows}x{cols} r={rank} {label:18} {name:15} failed: {type(exc).__name__}")
                    continue
                floor = moved / 2 if name == "norm_sweep" else moved
                print(f"{rows}x{cols} r={rank} {label:18} {name:15} {us:7.1f} us "
                      f"{100 * floor / us / 1e3 / args.copy_gbs:5.1f}% of copy")


if __name__ == "__main__":
    main()
