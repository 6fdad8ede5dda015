"""`aligned_rows`: a copy of a matrix whose rows start on aligned addresses, for kernels that stream it.

A row-major matrix whose row stride is not a multiple of 16 elements (LLaMA's 5461-wide MLP) cannot be read
with vector loads: neither cuBLAS's fast kernels nor Triton's pipelined ones take it, and GEMMs that read it
more than once run several times slower than on a padded copy (bench/NOTES.md, twenty-second session).
"""

import torch

from .._dispatch import op, register_backend

ALIGN_ELEMENTS = 16  # Triton specialises integer arguments divisible by 16: such strides let it vectorise rows


def padded_width(cols: int) -> int:
    """The row stride of `aligned_rows`' buffer: `cols` rounded up to a multiple of 16, at least 16."""
    return max(-(-cols // ALIGN_ELEMENTS), 1) * ALIGN_ELEMENTS


def needs_alignment(x: torch.Tensor) -> bool:
    """Whether `x` (2-D) is row-major with rows that do not start every 16 elements (so `aligned_rows` pays)."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(0) % ALIGN_ELEMENTS != 0


@op("aligned_rows")
def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x (rows, cols) copied into a zeroed buffer (rows, padded_width(cols)): the (rows, cols) view of it, whose
    row stride is a multiple of 16 elements; the padding columns past `cols` hold zeros."""
    if x.dim() != 2:
        raise ValueError(f"aligned_rows: x must be a 2-D (rows, cols) tensor, got shape {tuple(x.shape)}")
    buffer = x.new_zeros(x.shape[0], padded_width(x.shape[1]))
    buffer[:, : x.shape[1]].copy_(x)
    return buffer[:, : x.shape[1]]


@aligned_rows.custom_op.register_fake
def _(x):
    if x.dim() != 2:
        raise ValueError(f"aligned_rows: x must be a 2-D (rows, cols) tensor, got shape {tuple(x.shape)}")
    return x.new_empty(x.shape[0], padded_width(x.shape[1]))[:, : x.shape[1]]


register_backend("aligned_rows", "triton", "gradnormlorp_kernels.triton.aligned_rows", "aligned_rows")
