"""adapter_row_norm's sweep at each target of column-split programs: the op itself, the sweep with A A^T
(adapter_weight's first pass) and adapter_weight, on LLaMA-like shapes; kernel time from CUDA graphs
(`time_kernels`), in us and % of the byte floor (W0 read once; adapter_weight: read and written once) at the
copy bandwidth, with the tile autotune chose.

    python bench/time_adapter_splits.py [--copy-gbs 4243] [--targets 256 512 ...]
"""

import argparse

import torch
import triton

from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.triton import linear, row_norm
from gradnormlorp_kernels.triton.splits import split_range

SHAPES = [(11008, 4096, 16), (4096, 4096, 16), (4096, 11008, 16), (4096, 4096, 64), (14336, 4096, 16),
          (8192, 4096, 16), (11008, 4096, 64)]
TARGETS = (256, 512, 688, 1024, 2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gbs", type=float, default=4243.0)
    parser.add_argument("--targets", type=int, nargs="+", default=TARGETS, help="column-split program targets")
    args = parser.parse_args()
    device = torch.device("cuda")
    for rows, cols, rank in SHAPES:
        base = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_A = torch.randn(rank, cols, device=device, dtype=torch.bfloat16) / cols**0.5
        lora_B = torch.randn(rows, rank, device=device, dtype=torch.bfloat16) * 0.05
        magnitude = (torch.rand(rows, device=device) + 0.5).bfloat16()
        read = base.numel() * base.element_size()
        for target in args.targets:
            # Every sweep of this process at this target (with or without A A^T), and a fresh tile memo.
            row_norm._column_ranges = lambda r, c, with_gram=False, t=target: split_range(
                c, row_norm._SPLIT_COLUMNS.value, triton.cdiv(r, row_norm._TYPICAL_ROWS), t)
            row_norm._CHOSEN.clear()
            splits, per_split = row_norm._column_ranges(rows, cols)
            runs = {
                "adapter_row_norm": lambda: row_norm.adapter_row_norm(base, lora_A, lora_B, 2.0),
                "sweep + A A^T": lambda: row_norm.adapter_row_norm_partials(base, lora_A, lora_B, 2.0, rank <= 64),
                "adapter_weight": lambda: linear.adapter_weight(base, lora_A, lora_B, magnitude, 2.0),
            }
            for name, fn in runs.items():
                us = 1e3 * time_kernels(fn, device).median_ms
                moved = 2 * read if name == "adapter_weight" else read
                chosen = list(row_norm._CHOSEN.values())[-1] if row_norm._CHOSEN else ""
                print(f"{rows}x{cols} r={rank} target {target:5d} ({splits} x {per_split:5d} columns) {name:17} "
                      f"{us:7.1f} us {100 * moved / us / 1e3 / args.copy_gbs:5.1f}% of copy  {chosen}")


if __name__ == "__main__":
    main()
