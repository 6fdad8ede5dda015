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

# Programs the column pass aims for: enough to cover a GPU's multiprocessors several times over.
_TARGET_PROGRAMS = 512


@triton.jit
def _column_partials_kernel(
    g_ptr, y_ptr, bias_ptr, xa_ptr, partial_ptr, partial_xa_ptr, rows, cols, rank, rows_per_split,
    stride_g, stride_y, stride_xa,
    HAS_BIAS: tl.constexpr, HAS_XA: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
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
    for start in range(first, tl.minimum(first + rows_per_split, rows), BLOCK_T):
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
    partial_ptr, partial_xa_ptr, magnitude_ptr, norm_ptr, base_a_ptr, b_gram_ptr,
    row_scale_ptr, c2_ptr, grad_magnitude_ptr, grad_b_ptr,
    cols, rank, splits, stride_base_a, stride_b_gram, scaling,
    DETACH: tl.constexpr, HAS_XA: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """c1 = M / n, dM = colsum(g (y - b)) / M, c2 = M dM / n^2 (0 detached); in adapter mode also
    dB = s (c1 * g^T (x A^T) - c2 * (W0 A^T + s B (A A^T))), from the partials of the column pass."""
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
    row_scale = m / n
    if DETACH:
        c2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        c2 = m * grad_magnitude / (n * n)
    tl.store(row_scale_ptr + col, row_scale, mask=col_mask)
    tl.store(c2_ptr + col, c2, mask=col_mask)
    tl.store(grad_magnitude_ptr + col, grad_magnitude, mask=col_mask)
    if HAS_XA:
        grad_b = g_xa * row_scale[:, None]
        if not DETACH:
            base_a = tl.load(base_a_ptr + col[:, None] * stride_base_a + r[None, :], mask=xa_mask, other=0.0)
            b_gram = tl.load(b_gram_ptr + col[:, None] * stride_b_gram + r[None, :], mask=xa_mask, other=0.0)
            grad_b = grad_b - c2[:, None] * (base_a.to(tl.float32) + scaling * b_gram.to(tl.float32))
        grad_b = _round_to(scaling * grad_b, grad_b_ptr.dtype.element_ty, BITWISE_BF16)
        tl.store(grad_b_ptr + col[:, None] * rank + r[None, :], grad_b, mask=xa_mask)


def column_pass(grad_out, out, bias, magnitude, norm, detach_norm, lora=None):
    """`(c1, c2, dM, dB)` from one read of `grad_out` and `out`; c1, c2, dM in float32. `lora`, in adapter
    mode, is `(x_A, W0 A^T, B (A A^T), s, dtype of dB)`; without it dB is None. Inputs must not be
    float64 (the callers route that to the reference)."""
    rows, cols = grad_out.shape
    device = grad_out.device
    magnitude, norm = magnitude.contiguous(), norm.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    out = out if out.stride(1) == 1 else out.contiguous()
    has_xa = lora is not None
    row_scale = torch.empty(cols, dtype=torch.float32, device=device)
    c2 = torch.empty_like(row_scale)
    grad_magnitude = torch.empty_like(row_scale)
    if has_xa:
        x_A, base_A, b_gram, scaling, grad_dtype = lora
        x_A = x_A if x_A.stride(1) == 1 else x_A.contiguous()
        base_A = base_A if base_A.stride(1) == 1 else base_A.contiguous()
        b_gram = b_gram if b_gram.stride(1) == 1 else b_gram.contiguous()
        rank = x_A.shape[1]
        grad_B = torch.empty(cols, rank, dtype=grad_dtype, device=device)
    else:
        rank, scaling, grad_dtype, grad_B = 0, 0.0, torch.float32, None
    if cols == 0:
        return row_scale, c2, grad_magnitude, grad_B
    block_r = max(16, triton.next_power_of_2(rank))
    # Tiles whose (block_n, r) accumulator fits in registers without spilling (sm_90 resource report).
    block_n = 128 if not has_xa else (64 if block_r <= 32 else 32)
    block_t = 64 if has_xa and block_r <= 32 else 32
    col_blocks = triton.cdiv(cols, block_n)
    splits = max(1, min(triton.cdiv(rows, block_t), triton.cdiv(_TARGET_PROGRAMS, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_t) * block_t
    splits = max(1, triton.cdiv(rows, rows_per_split))
    partial = torch.empty(splits, cols, dtype=torch.float32, device=device)
    if has_xa:
        partial_xa = torch.empty(splits, cols, rank, dtype=torch.float32, device=device)
    else:
        x_A = base_A = b_gram = partial_xa = partial  # unused pointers
    native = (has_xa and grad_out.dtype == x_A.dtype and grad_out.dtype in (torch.bfloat16, torch.float16)
              and not triton_interpreted())
    _column_partials_kernel[(col_blocks, splits)](
        grad_out, out, bias if bias is not None else partial, x_A, partial, partial_xa, rows, cols, rank,
        rows_per_split, grad_out.stride(0), out.stride(0), x_A.stride(0) if has_xa else 0,
        HAS_BIAS=bias is not None, HAS_XA=has_xa, NATIVE_DOT=native,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )
    finish_block = 64 if block_r <= 32 else 16
    _finish_coefficients_kernel[(triton.cdiv(cols, finish_block),)](
        partial, partial_xa, magnitude, norm, base_A, b_gram, row_scale, c2, grad_magnitude,
        grad_B if has_xa else partial, cols, rank, splits,
        base_A.stride(0) if has_xa else 0, b_gram.stride(0) if has_xa else 0, float(scaling),
        DETACH=bool(detach_norm), HAS_XA=has_xa, BITWISE_BF16=bitwise_bf16(grad_dtype),
        BLOCK_N=finish_block, BLOCK_R=block_r, num_warps=4,
    )
    return row_scale, c2, grad_magnitude, grad_B


def norm_coefficients(grad_out, out, bias, magnitude, norm, detach_norm):
    """Same contract as the reference op; float64 takes the reference path."""
    if torch.float64 in (grad_out.dtype, out.dtype, magnitude.dtype, norm.dtype):
        return norm_coefficients_op.reference(grad_out, out, bias, magnitude, norm, detach_norm)
    row_scale, c2, grad_magnitude, _ = column_pass(grad_out, out, bias, magnitude, norm, detach_norm)
    return row_scale, c2, grad_magnitude
