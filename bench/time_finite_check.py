"""The 8-bit Adam update's finiteness check by tile (elements and warps per program), then the whole
`ops.adam_update` at the chosen tile: each program of the check ends on two atomics to one address, so its
program count, not only its reads, sets its time.

    python bench/time_finite_check.py
"""

import torch
import triton

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.benchmarks import _timing
from gradnormlorp_kernels.triton import adam_update as triton_adam


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))

    def microseconds(fn) -> float:
        return _timing.time_kernels(fn, device).median_ms * 1e3

    for shape in [(1024, 4096), (4096, 8192)]:
        numel = shape[0] * shape[1]
        blocks = -(-numel // ops.BLOCK_SIZE)
        grad = torch.randn(shape, device=device)
        flags = torch.zeros(2, dtype=torch.int32, device=device)
        step, skipped = torch.full((), 10.0, device=device), torch.zeros((), device=device)
        for block in (4096, 8192, 16384, 32768):
            for warps in (4, 8, 16):
                us = microseconds(lambda: triton_adam._finite_check_kernel[(triton.cdiv(numel, block),)](
                    grad.view(-1), numel, flags, step, skipped, BLOCK=block, num_warps=warps))
                rate = numel * 4 / us / 1e3
                print(f"{shape} check BLOCK={block:6d} warps={warps:2d}: {us:6.1f} us = {rate:5.0f} GB/s")
        exp_avg = torch.randint(0, 256, shape, device=device, dtype=torch.uint8)
        exp_avg_sq = torch.randint(0, 256, shape, device=device, dtype=torch.uint8)
        absmax_avg, absmax_avg_sq = torch.rand(blocks, device=device), torch.rand(blocks, device=device)
        code_signed, code_unsigned = ops.dynamic_map(True, device), ops.dynamic_map(False, device)
        us = microseconds(lambda: ops.adam_update(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed,
                                                  code_unsigned, step, skipped, 0.9, 0.999, 1e-8))
        print(f"{shape} adam_update (check BLOCK={triton_adam._CHECK_BLOCK}, warps={triton_adam._CHECK_WARPS}): "
              f"{us:6.1f} us")


if __name__ == "__main__":
    main()
