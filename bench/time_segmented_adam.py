"""The optimizer's 8-bit Adam over the projected moments of LLaMA-1B's 28 benchmark matrices (rank 128, bf16
gradients): one `segmented_adam_update` against 28 `adam_update` launches, kernel time from CUDA graphs
(`time_kernels`), and the segmented kernel's candidate tiles.

    python bench/time_segmented_adam.py [--rank 128] [--configs]
"""

import argparse
import itertools

import torch

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.benchmarks._timing import time_kernels
from gradnormlorp_kernels.benchmarks.optimizer import SIZES, weight_shapes
from gradnormlorp_kernels.triton import segmented_adam_update as kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--copy-gbs", type=float, default=3001.0)
    parser.add_argument("--configs", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    numels = [args.rank * max(shape) for shape in weight_shapes(SIZES["full"])]
    starts, counts, total = ops.segment_layout(numels, device)
    grad = torch.randn(total, device=device).bfloat16()
    codes = ops.dynamic_map(True, device), ops.dynamic_map(False, device)
    m = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device)
    v = torch.randint(0, 256, (total,), dtype=torch.uint8, device=device)
    absmax_m = torch.rand(total // ops.BLOCK_SIZE, device=device)
    absmax_v = torch.rand(total // ops.BLOCK_SIZE, device=device)
    step = torch.full((len(numels),), 10.0, device=device)
    skipped = torch.zeros(len(numels), device=device)
    scale = torch.full((), 1e-3, device=device)
    spans = [(s, n) for s, n in zip(starts.tolist(), numels)]

    def segmented():
        ops.segmented_adam_update(grad, m, v, absmax_m, absmax_v, *codes, starts, counts, step, skipped, 0.9, 0.999,
                                  1e-8, scale, torch.bfloat16)

    def per_matrix():
        for index, (s, n) in enumerate(spans):
            block = s // ops.BLOCK_SIZE
            blocks = -(-n // ops.BLOCK_SIZE)
            direction = ops.adam_update(grad[s:s + n], m[s:s + n], v[s:s + n], absmax_m[block:block + blocks],
                                        absmax_v[block:block + blocks], *codes, step[index], skipped[index], 0.9,
                                        0.999, 1e-8)
            (direction * scale).bfloat16()

    moved = sum(numels) * (2 + 1 + 1 + 1 + 1 + 2)  # gradient, moments read and written, bf16 direction
    runs = {"segmented_adam_update": segmented, "28 x adam_update + scale": per_matrix}
    if args.configs:
        for blocks, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
            def configured(blocks=blocks, warps=warps):
                kernel._QUANTIZED_BLOCKS, kernel._QUANTIZED_WARPS = blocks, warps
                try:
                    segmented()
                finally:
                    kernel._QUANTIZED_BLOCKS, kernel._QUANTIZED_WARPS = saved
            saved = kernel._QUANTIZED_BLOCKS, kernel._QUANTIZED_WARPS
            runs[f"  blocks {blocks:2} warps {warps}"] = configured
    for name, fn in runs.items():
        us = 1e3 * time_kernels(fn, device).median_ms
        print(f"{len(numels)} segments, {sum(numels) / 1e6:.1f}M elements  {name:26} {us:7.1f} us  "
              f"{100 * moved / us / 1e3 / args.copy_gbs:5.1f}% of copy")


if __name__ == "__main__":
    main()
