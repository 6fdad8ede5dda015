"""The backward's per-row coefficients from one pass over `g` and the saved output `y` (T, out).

Each program sums a slab of rows for a block of columns into a float32 partial (deterministic: no
atomics); a second small kernel adds the partials and forms c1 = M / n, dM, c2. In adapter mode the
same pass also accumulates `g^T (x A^T)` and the finishing kernel forms dB, so the backward reads `g`
for it no second time.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops.norm_coefficients import norm_coefficients as norm_coefficients_op
from .rounding import _round_to, bitwise_bf16
from .splits import TARGET_PROGRAMS, split_range

# (BLOCK_T, BLOCK_N, warps, stages) of the column pass and the programs its row splits aim for, with the adapter
# factors up to rank 32 and without them (norm_coefficients, full mode). bench/time_column_pass.py --configs
# --plain (H200, 8192 x 4096 bf16, both kernels): with factors (r=16) 37.8 us = 84% of copy, against 55.1 for
# (64, 64, 4, default) at 512 programs; without, 34.7 us against 37.1 for (64, 64, 4, 4) at 512. 256 programs
# were the faster for every tile near the top (fewer row splits: smaller partials for the finishing kernel).
PARTIALS_TILE = (32, 64, 4, 4)
PARTIALS_PROGRAMS = 256


@triton.jit
def _column_partials_kernel(
    g_ptr, y_ptr, bias_ptr, xa_ptr, partial_ptr, partial_xa_ptr, rows, cols, rank, rows_per_split,
    stride_g, stride_y, stride_xa,
    HAS_BIAS: tl.constexpr, HAS_XA: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
):
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    col = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col < cols
    r = tl.arange(0, BLOCK_R)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
    products = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    g_xa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    first = split * rows_per_split
    # Stages None: the compiler's default pipelining.
    for start in tl.range(first, tl.minimum(first + rows_per_split, rows), BLOCK_T, num_stages=STAGES):
        row = start + tl.arange(0, BLOCK_T)
        row_mask = row < rows
        row = row.to(tl.int64)  # (T, out) activations may pass 2^31 elements
        mask = row_mask[:, None] & col_mask[None, :]
        g = tl.load(g_ptr + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + row[:, None] * stride_y + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = tl.where(mask, y - bias[None, :], 0.0)
        products += g.to(tl.float32) * y
        if HAS_XA:
            xa = tl.load(xa_ptr + row[:, None] * stride_xa + r[None, :], mask=row_mask[:, None] & (r < rank)[None, :],
                         other=0.0)
            if NATIVE_DOT:
                g_xa += tl.dot(tl.trans(g), xa)
            else:
                g_xa += tl.dot(tl.trans(g.to(tl.float32)), xa.to(tl.float32), input_precision="ieee")
    tl.store(partial_ptr + split * cols + col, tl.sum(products, axis=0), mask=col_mask)
    if HAS_XA:
        tl.store(partial_xa_ptr + (split * cols + col[:, None]) * rank + r[None, :], g_xa,
                 mask=col_mask[:, None] & (r < rank)[None, :])


@triton.jit
def _finish_coefficients_kernel(
    partial_ptr, partial_xa_ptr, magnitude_ptr, norm_ptr, weight_a_ptr, b_ptr,
    row_scale_ptr, c2_ptr, grad_magnitude_ptr, grad_b_ptr, b_scaled_ptr, b_c2_ptr,
    cols, rank, splits, stride_weight_a, stride_b, scaling,
    DETACH: tl.constexpr, HAS_XA: tl.constexpr, BITWISE_BF16_GRAD_M: tl.constexpr, BITWISE_BF16_GRAD_B: tl.constexpr,
    BITWISE_BF16_FACTORS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """c1 = M / n, dM = colsum(g (y - b)) / M, c2 = M dM / n^2 (0 detached); in adapter mode also
    dB = s (c1 * g^T (x A^T) - c2 * (W' A^T)) from the partials of the column pass, and the backward's small
    factors s c1 B and s (c2 / c1) B = s (dM / n) B (in x's dtype), so that they cost no launches of their own."""
    col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col < cols
    r = tl.arange(0, BLOCK_R)
    xa_mask = col_mask[:, None] & (r < rank)[None, :]
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_xa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for split in range(0, splits):
        total += tl.load(partial_ptr + split * cols + col, mask=col_mask, other=0.0)
        if HAS_XA:
            g_xa += tl.load(partial_xa_ptr + (split * cols + col[:, None]) * rank + r[None, :], mask=xa_mask,
                            other=0.0)
    m = tl.load(magnitude_ptr + col, mask=col_mask, other=1.0).to(tl.float32)
    n = tl.load(norm_ptr + col, mask=col_mask, other=1.0).to(tl.float32)
    grad_magnitude = total / m
    row_scale = tl.div_rn(m, n)  # as the forward's weight kernel: the backward rebuilds that very weight
    if DETACH:
        c2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        c2 = m * grad_magnitude / (n * n)
    tl.store(row_scale_ptr + col, row_scale, mask=col_mask)
    tl.store(c2_ptr + col, c2, mask=col_mask)
    tl.store(grad_magnitude_ptr + col,
             _round_to(grad_magnitude, grad_magnitude_ptr.dtype.element_ty, BITWISE_BF16_GRAD_M), mask=col_mask)
    if HAS_XA:
        b = tl.load(b_ptr + col[:, None] * stride_b + r[None, :], mask=xa_mask, other=0.0).to(tl.float32)
        b_scaled = _round_to(scaling * b * row_scale[:, None], b_scaled_ptr.dtype.element_ty, BITWISE_BF16_FACTORS)
        tl.store(b_scaled_ptr + col[:, None] * rank + r[None, :], b_scaled, mask=xa_mask)
        grad_b = g_xa * row_scale[:, None]
        if not DETACH:
            weight_a = tl.load(weight_a_ptr + col[:, None] * stride_weight_a + r[None, :], mask=xa_mask, other=0.0)
            grad_b = grad_b - c2[:, None] * weight_a.to(tl.float32)
            b_c2 = _round_to(scaling * b * (grad_magnitude / n)[:, None], b_c2_ptr.dtype.element_ty,
                             BITWISE_BF16_FACTORS)
            tl.store(b_c2_ptr + col[:, None] * rank + r[None, :], b_c2, mask=xa_mask)
        grad_b = _round_to(scaling * grad_b, grad_b_ptr.dtype.element_ty, BITWISE_BF16_GRAD_B)
        tl.store(grad_b_ptr + col[:, None] * rank + r[None, :], grad_b, mask=xa_mask)


class AdapterFactors:
    """What the column pass needs and gives in adapter mode. In: x A^T (T, r), W' A^T (out, r), B (out, r),
    s, and the dtypes of dB and of x. Out (after `column_pass`): dB, s c1 B and, unless detached,
    s (c2 / c1) B, both in x's dtype."""

    def __init__(self, x_A, weight_A, lora_B, scaling, grad_dtype, x_dtype):
        self.x_A = x_A if x_A.stride(1) == 1 else x_A.contiguous()
        self.weight_A = weight_A if weight_A.stride(1) == 1 else weight_A.contiguous()
        self.lora_B = lora_B if lora_B.stride(1) == 1 else lora_B.contiguous()
        self.scaling = float(scaling)
        self.dtypes = (grad_dtype, x_dtype)
        self.grad_B = self.B_scaled = self.B_c2 = None


def column_pass(grad_out, out, bias, magnitude, norm, detach_norm, lora=None, grad_magnitude_dtype=torch.float32,
                config=None, programs=None):
    """`(c1, c2, dM)` from one read of `grad_out` and `out`; c1, c2 in float32, dM in `grad_magnitude_dtype`.
    `lora` (an `AdapterFactors`), in adapter mode, receives dB and the backward's small factors. Inputs must
    not be float64 (the callers route that to the reference). `config` (BLOCK_T, BLOCK_N, warps, stages) and
    `programs` (how many the row splits aim for) override the tile (bench/time_column_pass.py)."""
    rows, cols = grad_out.shape
    device = grad_out.device
    magnitude, norm = magnitude.contiguous(), norm.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    out = out if out.stride(1) == 1 else out.contiguous()
    has_xa = lora is not None
    row_scale = torch.empty(cols, dtype=torch.float32, device=device)
    c2 = torch.empty_like(row_scale)
    grad_magnitude = torch.empty(cols, dtype=grad_magnitude_dtype, device=device)
    if has_xa:
        rank = lora.x_A.shape[1]
        grad_dtype, x_dtype = lora.dtypes
        lora.grad_B = torch.empty(cols, rank, dtype=grad_dtype, device=device)
        lora.B_scaled = torch.empty(cols, rank, dtype=x_dtype, device=device)
        if not detach_norm:
            lora.B_c2 = torch.empty(cols, rank, dtype=x_dtype, device=device)
    else:
        rank, grad_dtype, x_dtype = 0, torch.float32, torch.float32
    if cols == 0:
        return row_scale, c2, grad_magnitude
    block_r = max(16, triton.next_power_of_2(rank))
    # Tiles whose (block_n, r) accumulator fits in registers without spilling (sm_90 resource report).
    if has_xa and block_r > 32:  # stages None: the compiler's default pipelining of the loop (with its dot)
        default_tile, default_programs = (32, 32, 4, None), TARGET_PROGRAMS
    else:
        default_tile, default_programs = PARTIALS_TILE, PARTIALS_PROGRAMS
    block_t, block_n, warps, stages = config or default_tile
    programs = programs or default_programs
    col_blocks = triton.cdiv(cols, block_n)
    splits, rows_per_split = split_range(rows, block_t, col_blocks, programs)
    partial = torch.empty(splits, cols, dtype=torch.float32, device=device)
    x_A = lora.x_A if has_xa else partial  # unused pointers without adapter factors
    partial_xa = torch.empty(splits, cols, rank, dtype=torch.float32, device=device) if has_xa else partial
    native = (has_xa and grad_out.dtype == x_A.dtype and grad_out.dtype in (torch.bfloat16, torch.float16)
              and not triton_interpreted())
    _column_partials_kernel[(col_blocks, splits)](
        grad_out, out, bias if bias is not None else partial, x_A, partial, partial_xa, rows, cols, rank,
        rows_per_split, grad_out.stride(0), out.stride(0), x_A.stride(0) if has_xa else 0,
        HAS_BIAS=bias is not None, HAS_XA=has_xa, NATIVE_DOT=native,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, STAGES=stages, num_warps=warps,
    )
    finish_block = 64 if block_r <= 32 else 16
    unused = partial
    _finish_coefficients_kernel[(triton.cdiv(cols, finish_block),)](
        partial, partial_xa, magnitude, norm, lora.weight_A if has_xa else unused, lora.lora_B if has_xa else unused,
        row_scale, c2, grad_magnitude, lora.grad_B if has_xa else unused, lora.B_scaled if has_xa else unused,
        lora.B_c2 if has_xa and lora.B_c2 is not None else unused,
        cols, rank, splits, lora.weight_A.stride(0) if has_xa else 0, lora.lora_B.stride(0) if has_xa else 0,
        lora.scaling if has_xa else 0.0,
        DETACH=bool(detach_norm), HAS_XA=has_xa, BITWISE_BF16_GRAD_M=bitwise_bf16(grad_magnitude_dtype),
        BITWISE_BF16_GRAD_B=bitwise_bf16(grad_dtype), BITWISE_BF16_FACTORS=bitwise_bf16(x_dtype),
        BLOCK_N=finish_block, BLOCK_R=block_r, num_warps=4,
    )
    return row_scale, c2, grad_magnitude


def norm_coefficients(grad_out, out, bias, magnitude, norm, detach_norm):
    """Same contract as the reference op; float64 takes the reference path."""
    if torch.float64 in (grad_out.dtype, out.dtype, magnitude.dtype, norm.dtype):
        return norm_coefficients_op.reference(grad_out, out, bias, magnitude, norm, detach_norm)
    return column_pass(grad_out, out, bias, magnitude, norm, detach_norm)
