"""Rounding float32 results to the storage dtype the same way on the GPU and under the interpreter."""

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted


@triton.jit
def _round_to(x, dtype: tl.constexpr, BITWISE_BF16: tl.constexpr):
    """x (float32) rounded to nearest-even in `dtype`. The interpreter truncates float32 to bfloat16,
    so there (BITWISE_BF16) the rounding is done on the bits; the GPU's own conversion rounds correctly."""
    if BITWISE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def bitwise_bf16(dtype: torch.dtype) -> bool:
    """The BITWISE_BF16 argument of `_round_to` for a result stored as `dtype`."""
    return dtype == torch.bfloat16 and triton_interpreted()
