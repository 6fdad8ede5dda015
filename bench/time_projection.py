"""P^T G for a weight whose rows are not 16-byte aligned (LLaMA-1B's down projection, 2048 x 5461 bf16, r=128):
cuBLAS (torch.matmul) against the Triton thin GEMM `matmul_f32`, `do_bench` medians.

    python bench/time_projection.py
"""

import torch
import triton.testing

from gradnormlorp_kernels.triton.linear import matmul_f32


def main() -> None:
    for rows, cols in ((2048, 5461), (2048, 2048)):
        grad = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        left = torch.linalg.qr(torch.randn(rows, 128, device="cuda")).Q.to(torch.bfloat16)
        cublas = triton.testing.do_bench(lambda: left.T @ grad)
        ours = triton.testing.do_bench(lambda: matmul_f32(left.T, grad))
        print(f"{rows}x{cols} r=128: torch.matmul {1e3 * cublas:.1f} us, matmul_f32 {1e3 * ours:.1f} us")


if __name__ == "__main__":
    main()
