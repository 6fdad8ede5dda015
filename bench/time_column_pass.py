"""The backward's column pass (`column_pass`: the partials kernel over g and y, then the finishing kernel) at
the layer benchmark's shape, with the adapter factors (x A^T, dB) and without (full mode), at each candidate
tile (BLOCK_T, BLOCK_N, warps, stages) and program target; kernel time from CUDA graphs (`time_kernels`), in us
and % of the byte floor (g and y read once) at the copy bandwidth.

    python bench/time_column_pass.py [--copy-gbs 4243] [--configs] [--tokens 8192] [--dim 4096] [--rank 16]
"""

import argparse
import itertools

import torch

from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton.norm_coefficients import AdapterFactors, column_pass

TILES = [(t, n, w, s) for t, n, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (None, 3, 4))
         if 2048 <= t * n <= 8192]
PROGRAMS = (256, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gbs", type=float, default=4243.0)
    parser.add_argument("--configs", action="store_true", help="time every candidate, not only the default")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--plain", action="store_true", help="also full mode's pass, without adapter factors")
    args = parser.parse_args()
    device = torch.device("cuda")
    tokens, dim, rank = args.tokens, args.dim, args.rank
    g = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    y = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    bias = torch.randn(dim, device=device, dtype=torch.bfloat16)
    magnitude = (torch.rand(dim, device=device) + 0.5).bfloat16()
    norm = torch.rand(dim, device=device) + 0.5
    x_A = torch.randn(tokens, rank, device=device, dtype=torch.bfloat16)
    weight_A = torch.randn(dim, rank, device=device)
    lora_B = torch.randn(dim, rank, device=device, dtype=torch.bfloat16)
    floor = 2 * g.numel() * g.element_size()
    candidates = [(None, None)] + (list(itertools.product(TILES, PROGRAMS)) if args.configs else [])
    for adapter in (True, False) if args.plain else (True,):
        for config, programs in candidates:
            def run():
                factors = AdapterFactors(x_A, weight_A, lora_B, 2.0, torch.bfloat16, torch.bfloat16) if adapter \
                    else None
                return column_pass(g, y, bias, magnitude, norm, False, factors, torch.bfloat16, config, programs)

            label = "default" if config is None else "t{} n{} w{} s{} p{}".format(*config, programs)
            name = f"adapter r={rank}" if adapter else "plain"
            try:
                us = 1e3 * time_kernels(run, device).median_ms
            except Exception as exc:  # a tile that does not compile or fit is reported, not fatal
                print(f"{tokens}x{dim} {name:12} {label:24} failed: {type(exc).__name__}", flush=True)
                continue
            print(f"{tokens}x{dim} {name:12} {label:24} {us:7.1f} us {100 * floor / us / 1e3 / args.copy_gbs:5.1f}% "
                  "of copy", flush=True)


if __name__ == "__main__":
    main()
