"""The layer's weight kernels: the forward's W = diag(M / n)(W0 + s B A) with n and W' A^T (`adapter_weight`:
the norm pass `_weight_norm_partials_kernel`, then `_normalized_weight_kernel`), the norm pass alone, the
backward's rebuild from a known row scale, and full mode's diag(c) V, at each candidate (BLOCK_M, BLOCK_N,
warps, stages) and, for the norm pass, programs aimed for; kernel time from CUDA graphs (`time_kernels`), in
us and % of the byte floor (W0 read once, W written once; the norm pass: W0 read once) at the copy bandwidth.

    python bench/time_normalized_weight.py [--copy-gbs 4243] [--configs] [--shapes 2]
"""

import argparse
import itertools

import torch
import triton

from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton import linear

SHAPES = [(4096, 4096, 16), (11008, 4096, 16), (4096, 4096, 64)]
CANDIDATES = list(itertools.product((16, 32), (128, 256, 512), (4, 8), (2, 4)))
PROGRAMS = (512, 256, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gbs", type=float, default=4243.0)
    parser.add_argument("--configs", action="store_true", help="time every candidate, not only the default")
    parser.add_argument("--shapes", type=int, default=None, help="the first N shapes (with --configs: 1)")
    args = parser.parse_args()
    device = torch.device("cuda")
    for rows, cols, rank in SHAPES[:args.shapes or (1 if args.configs else len(SHAPES))]:
        base = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_A = torch.randn(rank, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_B = torch.randn(rows, rank, device=device, dtype=torch.bfloat16) * 0.05
        magnitude = (torch.rand(rows, device=device) + 0.5).bfloat16()
        row_scale = torch.rand(rows, device=device) + 0.5
        moved = 2 * base.numel() * base.element_size()
        configs = CANDIDATES if args.configs else [None]
        for config, programs in itertools.product(configs, PROGRAMS if args.configs else [linear._NORM_PROGRAMS]):
            linear._NORM_PROGRAMS = programs
            rank_block = max(16, triton.next_power_of_2(min(rank, linear._RANK_CHUNK)))
            norm_config = config or linear._tile_configs(rank_block, True)[0]
            runs = {
                "adapter_weight": lambda: linear._normalized_weight_launch(
                    base, lora_A, lora_B, magnitude, None, 2.0, base.dtype, True, None, config),
                "norm_pass": lambda: linear._weight_norm_partials(
                    base, lora_A, lora_B, 2.0, True, True, rank_block, norm_config),
                "rebuild": lambda: linear._normalized_weight_launch(
                    base, lora_A, lora_B, None, row_scale, 2.0, base.dtype, False, config),
                "full": lambda: linear._normalized_weight_launch(
                    base, None, None, None, row_scale, 0.0, base.dtype, False, config),
            }
            label = "default" if config is None else "m{} n{} w{} s{} p{}".format(*config, programs)
            for name, fn in runs.items():
                if programs != PROGRAMS[0] and name in ("rebuild", "full"):
                    continue
                try:
                    us = 1e3 * time_kernels(fn, device).median_ms
                except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                    print(f"{rows}x{cols} r={rank} {label:22} {name:15} failed: {type(exc).__name__}")
                    continue
                floor = moved / 2 if name == "norm_pass" else moved
                print(f"{rows}x{cols} r={rank} {label:22} {name:15} {us:7.1f} us "
                      f"{100 * floor / us / 1e3 / args.copy_gbs:5.1f}% of copy")


if __name__ == "__main__":
    main()
