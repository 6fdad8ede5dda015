"""Row norms in one read of the weight: `||V||_row`, and `||W0 + s B A||_row` together with `W0 A^T`."""

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops.row_norm import adapter_row_norm as adapter_row_norm_op, row_norm as row_norm_op
from ..ops._common import NORM_FLOOR


@triton.jit
def _row_norm_kernel(w_ptr, norm_ptr, rows, cols, stride_w, floor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    squares = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (col < cols)[None, :]
        w = tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += w * w
    norm = tl.maximum(tl.sqrt(tl.sum(squares, axis=1)), floor)
    tl.store(norm_ptr + row, norm, mask=row_mask)


@triton.jit
def _adapter_row_norm_kernel(
    w_ptr, a_ptr, b_ptr, b_gram_ptr, norm_ptr, base_a_ptr, rows, cols, rank,
    stride_w, stride_a, stride_b, stride_b_gram, scaling, floor,
    NATIVE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One sweep over a block of W0's rows: ||W0||^2 per row and W0 A^T, then the two rank-r corrections
    n^2 = ||W0||^2 + 2 s rowsum(B * W0 A^T) + s^2 rowsum((B (A A^T)) * B), with B (A A^T) given (out x r)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    base_a = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        col_mask = col < cols
        w = tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + r[:, None] * stride_a + col[None, :], mask=r_mask[:, None] & col_mask[None, :],
                    other=0.0)
        w32 = w.to(tl.float32)
        squares += tl.sum(w32 * w32, axis=1)
        if NATIVE_DOT:  # bf16/fp16 products are exact in the float32 accumulator
            base_a += tl.dot(w, tl.trans(a))
        else:
            base_a += tl.dot(w32, tl.trans(a.to(tl.float32)), input_precision="ieee")
    small_mask = row_mask[:, None] & r_mask[None, :]
    b = tl.load(b_ptr + row[:, None] * stride_b + r[None, :], mask=small_mask, other=0.0).to(tl.float32)
    b_gram = tl.load(b_gram_ptr + row[:, None] * stride_b_gram + r[None, :], mask=small_mask, other=0.0)
    squared = squares + (2.0 * scaling) * tl.sum(b * base_a, axis=1) + (scaling * scaling) * tl.sum(b_gram * b, axis=1)
    norm = tl.maximum(tl.sqrt(tl.maximum(squared, 0.0)), floor)
    tl.store(norm_ptr + row, norm, mask=row_mask)
    tl.store(base_a_ptr + row[:, None] * rank + r[None, :], base_a, mask=row_mask[:, None] & r_mask[None, :])


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """float32 row norms; float64 weights take the reference path (its exactness tests)."""
    if weight.dtype == torch.float64:
        return row_norm_op.reference(weight)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    rows, cols = weight.shape
    norm = torch.empty(rows, dtype=torch.float32, device=weight.device)
    if rows:
        block_m = 4
        _row_norm_kernel[(triton.cdiv(rows, block_m),)](
            weight, norm, rows, cols, weight.stride(0), NORM_FLOOR,
            BLOCK_M=block_m, BLOCK_N=min(1024, max(16, triton.next_power_of_2(cols))), num_warps=4,
        )
    return norm


def adapter_row_norm(base_weight, lora_A, lora_B, scaling):
    """`(n, W0 A^T)` as the reference, W0 read once; float64 takes the reference path."""
    if torch.float64 in (base_weight.dtype, lora_A.dtype, lora_B.dtype):
        return adapter_row_norm_op.reference(base_weight, lora_A, lora_B, scaling)
    base_weight = base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()
    lora_A = lora_A.contiguous()
    lora_B = lora_B.contiguous()
    rows, cols = base_weight.shape
    rank = lora_A.shape[0]
    block_r = max(16, triton.next_power_of_2(rank))
    a32 = lora_A.to(torch.float32)
    b_gram = lora_B.to(torch.float32) @ (a32 @ a32.T)  # (out, r): rank-r work, as the reference forms it
    norm = torch.empty(rows, dtype=torch.float32, device=base_weight.device)
    base_A = torch.empty(rows, rank, dtype=torch.float32, device=base_weight.device)
    if rows:
        # The interpreter has no bf16 arithmetic: there the products run in float32 (same values).
        native = (base_weight.dtype == lora_A.dtype and base_weight.dtype in (torch.bfloat16, torch.float16)
                  and not triton_interpreted())
        # Tiles sized so that the W0 tile, the A tile and the (rows, r) accumulator fit in registers
        # without spilling (checked in the sm_90 compiler's resource report).
        block_m = 16
        if not native:
            block_n, warps = (64 if block_r <= 32 else 32), 8
        elif block_r <= 32:
            block_n, warps = 256, 4
        else:
            block_n, warps = (128 if block_r <= 64 else 32), 8
        _adapter_row_norm_kernel[(triton.cdiv(rows, block_m),)](
            base_weight, lora_A, lora_B, b_gram, norm, base_A, rows, cols, rank,
            base_weight.stride(0), lora_A.stride(0), lora_B.stride(0), b_gram.stride(0), float(scaling), NORM_FLOOR,
            NATIVE_DOT=native, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
        )
    return norm, base_A
