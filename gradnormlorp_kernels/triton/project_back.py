"""Project the Adam direction back and update the weight in place, with its new row norms, in one pass."""

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops._common import NORM_FLOOR
from ..ops.aligned_rows import needs_alignment
from ..ops.project_back import project_back_update as project_back_update_op
from .aligned_rows import aligned_rows
from .rounding import _round_to, bitwise_bf16
from .row_norm import row_norm
from .splits import split_range

# The one-sided bf16/fp16 kernel: (rows, columns, rank) of a tile, and warps. Weights with decay whose rows are
# 16-byte aligned (cuBLAS takes the others without decay) use a larger tile: H200, r = 512, 2048 x 2048 17.0 ->
# 13.6 us, 5461 x 2048 42.3 -> 35.2 (r = 128 even); on misaligned rows it is slower (bench/NOTES.md).
_ONE_SIDED_TILE, _ONE_SIDED_WARPS = (64, 64, 64), 4
_ALIGNED_DECAY_TILE, _ALIGNED_DECAY_WARPS = (128, 128, 64), 8


@triton.jit
def _project_back_update_kernel(
    w_ptr, left_ptr, right_ptr, gate_ptr, update_gate_ptr, squares_ptr, rows, cols, rank, cols_per_split,
    stride_w, stride_l0, stride_l1, stride_r0, stride_r1, step_size, decay,
    LOW_RANK: tl.constexpr, DOT_PRECISION: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """W <- W (1 - gate decay) - gate step_size (L R) for a block of rows and a range of columns, and the
    partial sums of squares of the stored result per row. With LOW_RANK the update L (rows, rank) @
    R (rank, cols) is formed tile by tile and never written; otherwise `right_ptr` is the (rows, cols)
    update. Tall row blocks keep the re-reads of R (from L2) a fraction of the weight's own bytes."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_mask = row < rows
    keep = 1.0 - tl.load(gate_ptr).to(tl.float32) * decay
    scale = tl.load(update_gate_ptr).to(tl.float32) * step_size
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * cols_per_split
    for start in range(first, tl.minimum(first + cols_per_split, cols), BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (col < cols)[None, :]
        if LOW_RANK:
            update = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r_start in range(0, rank, BLOCK_R):
                r = r_start + tl.arange(0, BLOCK_R)
                r_mask = r < rank
                left = tl.load(left_ptr + row[:, None] * stride_l0 + r[None, :] * stride_l1,
                               mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                right = tl.load(right_ptr + r[:, None] * stride_r0 + col[None, :] * stride_r1,
                                mask=r_mask[:, None] & (col < cols)[None, :], other=0.0).to(tl.float32)
                update += tl.dot(left, right, input_precision=DOT_PRECISION)
        else:
            update = tl.load(right_ptr + row[:, None] * stride_r0 + col[None, :] * stride_r1, mask=mask,
                             other=0.0).to(tl.float32)
        pointers = w_ptr + row[:, None] * stride_w + col[None, :]
        w = tl.load(pointers, mask=mask, other=0.0)
        new = _round_to(w.to(tl.float32) * keep - scale * update, w.dtype, BITWISE_BF16)
        tl.store(pointers, new, mask=mask)
        stored = new.to(tl.float32)  # the norm of what the next forward reads, after rounding
        squares += tl.sum(stored * stored, axis=1)
    tl.store(squares_ptr + split * rows + row, squares, mask=row_mask)


@triton.jit
def _one_sided_update_kernel(
    w_ptr, a_ptr, b_ptr, gate_ptr, rows, cols, cols_load, rank, stride_w, stride_a0, stride_a1, stride_b0, stride_b1,
    step_size, decay, DECAY: tl.constexpr, BITWISE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """W <- W (1 - gate decay) - step_size (A B) for one tile of a bf16/fp16 W, the factors rounded to W's dtype
    as the cuBLAS path rounds them (`DECAY` False: no decay, the gate not read). For weights whose rows are not
    16-byte aligned, where cuBLAS falls back to a slow kernel, and for any weight with decay, which cuBLAS cannot
    take from the device. B's columns are read up to `cols_load` >= cols: a padded B (`aligned_rows`) with vector
    loads."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < rows
    col_mask = col < cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        r = r_start + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        a = tl.load(a_ptr + row[:, None] * stride_a0 + r[None, :] * stride_a1,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + r[:, None] * stride_b0 + col[None, :] * stride_b1,
                    mask=r_mask[:, None] & (col < cols_load)[None, :], other=0.0).to(tl.float32)
        a = _round_to(a, w_ptr.dtype.element_ty, BITWISE_BF16)
        b = _round_to(b, w_ptr.dtype.element_ty, BITWISE_BF16)
        if BITWISE_BF16:  # the interpreter: bf16 values, multiplied in float32
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    pointers = w_ptr + row[:, None] * stride_w + col[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    w = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    if DECAY:
        w = w * (1.0 - tl.load(gate_ptr).to(tl.float32) * decay)
    tl.store(pointers, _round_to(w - step_size * acc, w_ptr.dtype.element_ty, BITWISE_BF16), mask=mask)


@triton.jit
def _row_norm_from_squares_kernel(squares_ptr, norm_ptr, rows, splits, floor, BLOCK: tl.constexpr):
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = row < rows
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        total += tl.load(squares_ptr + split * rows + row, mask=mask, other=0.0)
    tl.store(norm_ptr + row, tl.maximum(tl.sqrt(total), floor), mask=mask)


def project_back_update(weight, direction, left, right, step_size, decay, gate, with_norm=True, direction_gated=False):
    """Same contract as the reference op; float64 weights take the reference path.

    The update L R is, by projection: left only P @ N, right only N @ Q^T, both (P N) @ Q^T (P N is
    (out, r), formed first), none N itself. float32 weights use 3xTF32 products (float32 accuracy),
    narrower weights TF32 (the update is far below one rounding of the weight), except one-sided ones: their
    factors are rounded to the weight's dtype and multiplied on tensor cores (cuBLAS without decay where the
    rows are aligned, else `_one_sided_update_kernel`).
    """
    if weight.dtype == torch.float64:
        return project_back_update_op.reference(weight, direction, left, right, step_size, decay, gate, with_norm,
                                                direction_gated)
    if weight.stride(1) != 1:
        raise ValueError("weight must have unit stride along its rows to be updated in place")
    rows, cols = weight.shape
    one_sided_narrow = (weight.dtype in (torch.bfloat16, torch.float16) and (left is None) != (right is None)
                        and rows and cols)
    if one_sided_narrow and (weight.is_cuda or triton_interpreted()):
        # One-sided: W (1 - gate decay) + alpha L R accumulated in float32, W read and written once. The gated
        # direction and the projector are rounded to the weight's dtype, as GaLore's update is.
        if direction_gated:
            gated = direction.to(weight.dtype)
        else:
            gated = torch.empty(direction.shape, dtype=weight.dtype, device=weight.device)
            torch.mul(direction, gate.to(torch.float32), out=gated)
        factor_a, factor_b = (left, gated) if left is not None else (gated, right.T)
        aligned = (weight.stride(0) * weight.element_size()) % 16 == 0
        if decay == 0.0 and weight.is_cuda and aligned:
            weight.addmm_(factor_a.to(weight.dtype), factor_b.to(weight.dtype), alpha=-float(step_size))
        else:
            # Rows not 16-byte aligned (LLaMA's 5461-wide MLP): cuBLAS's fallback kernel there is slower
            # than this one, which forms the same rounded product tile by tile (bench/time_project_back.py).
            # With decay, whose factor 1 - gate decay lives on the device, every weight comes here.
            # A misaligned B (the direction N of a left projection: (r, cols) rows) is copied padded first: its
            # scalar loads kept the kernel from pipelining (H200, 2048 x 5461, r = 512: 101 -> 5 + 52 us;
            # r = 128: 41 -> 4 + 30).
            cols_load = cols
            if needs_alignment(factor_b):
                factor_b = aligned_rows(factor_b)
                cols_load = factor_b.stride(0)  # the padding, zeros, is ours to read
            (block_m, block_n, block_r), warps = ((_ALIGNED_DECAY_TILE, _ALIGNED_DECAY_WARPS) if aligned
                                                  else (_ONE_SIDED_TILE, _ONE_SIDED_WARPS))
            _one_sided_update_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
                weight, factor_a, factor_b, gate, rows, cols, cols_load, factor_a.shape[1], weight.stride(0),
                factor_a.stride(0), factor_a.stride(1), factor_b.stride(0), factor_b.stride(1), float(step_size),
                float(decay), DECAY=decay != 0.0, BITWISE_BF16=bitwise_bf16(weight.dtype), BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
            )
        return row_norm(weight) if with_norm else torch.empty(0, dtype=torch.float32, device=weight.device)
    direction = direction.to(torch.float32)
    if left is not None and right is not None:
        factor_left, factor_right = left.to(torch.float32) @ direction, right.to(torch.float32).T
    elif left is not None:
        factor_left, factor_right = left.to(torch.float32), direction
    elif right is not None:
        factor_left, factor_right = direction, right.to(torch.float32).T
    else:
        factor_left, factor_right = None, direction.contiguous()
    low_rank = factor_left is not None
    rank = factor_left.shape[1] if low_rank else 0
    if low_rank and decay == 0.0 and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
        gated_right = factor_right if direction_gated else factor_right * gate.to(torch.float32)
        gated_right = gated_right.to(weight.dtype)  # two-sided: (P N) Q^T
        weight.addmm_(factor_left.to(weight.dtype), gated_right, alpha=-float(step_size))
        return row_norm(weight) if with_norm else torch.empty(0, dtype=torch.float32, device=weight.device)
    norm = torch.empty(rows if with_norm else 0, dtype=torch.float32, device=weight.device)
    if rows == 0:
        return norm
    # Tiles checked spill-free in the sm_90 resource report; columns split so that a few hundred programs
    # stream the weight, each row's partial sums of squares added by a second small kernel.
    if not low_rank:
        block_m, block_n, warps = 16, 256, 4
    else:  # 3xTF32 products (float32 weights) need more registers
        block_m, block_n, warps = (32 if weight.dtype == torch.float32 else 64), 64, 8
    row_blocks = triton.cdiv(rows, block_m)
    splits, cols_per_split = split_range(cols, block_n, row_blocks)
    squares = torch.empty(splits, rows, dtype=torch.float32, device=weight.device)
    _project_back_update_kernel[(row_blocks, splits)](
        weight, factor_left if low_rank else factor_right, factor_right, gate,
        torch.ones_like(gate) if direction_gated else gate, squares, rows, cols, rank,
        cols_per_split, weight.stride(0), factor_left.stride(0) if low_rank else 0,
        factor_left.stride(1) if low_rank else 0, factor_right.stride(0), factor_right.stride(1),
        float(step_size), float(decay),
        LOW_RANK=low_rank, DOT_PRECISION="tf32x3" if weight.dtype == torch.float32 else "tf32",
        BITWISE_BF16=bitwise_bf16(weight.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=32, num_warps=warps,
    )
    if not with_norm:
        return norm
    finish_block = 1024
    _row_norm_from_squares_kernel[(triton.cdiv(rows, finish_block),)](
        squares, norm, rows, splits, NORM_FLOOR, BLOCK=finish_block, num_warps=4
    )
    return norm
