"""Copy a matrix into a buffer whose rows start every 16 elements, the padding zeroed: the loads of the source
are scalar (its rows are misaligned), the stores of whole padded rows vectorised. H200, 2048 x 5461 bf16:
12.5 us (84% of copy), against 26.5 for torch's copy into the padded view."""

import torch
import triton
import triton.language as tl

from ..ops.aligned_rows import aligned_rows as aligned_rows_op
from ..ops.aligned_rows import padded_width

_TILE = (32, 256)  # rows, columns of a program's tile: 32 elements a thread at 8 warps (no spills on sm_90)
_NUM_WARPS = 8


@triton.jit
def _aligned_rows_kernel(src_ptr, dst_ptr, rows, cols, padded, stride_src, stride_dst,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = (row < rows)[:, None]
    row64 = row.to(tl.int64)[:, None]
    values = tl.load(src_ptr + row64 * stride_src + col[None, :], mask=row_mask & (col < cols)[None, :], other=0.0)
    tl.store(dst_ptr + row64 * stride_dst + col[None, :], values, mask=row_mask & (col < padded)[None, :])


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """Same contract as the reference op; a source without unit column stride takes the reference path."""
    if x.dim() != 2 or x.stride(1) != 1:
        return aligned_rows_op.reference(x)
    rows, cols = x.shape
    padded = padded_width(cols)
    buffer = torch.empty(rows, padded, dtype=x.dtype, device=x.device)
    if buffer.numel():
        block_rows, block_cols = _TILE
        _aligned_rows_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(padded, block_cols))](
            x, buffer, rows, cols, padded, x.stride(0), padded, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=_NUM_WARPS,
        )
    return buffer[:, :cols]
