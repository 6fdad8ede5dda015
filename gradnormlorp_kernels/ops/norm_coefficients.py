"""The per-row coefficients of the weight-normalised backward, from one pass over `g` and `y`."""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import accumulation_dtype


@op("norm_coefficients")
def norm_coefficients(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    bias: Optional[torch.Tensor],
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    detach_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(c1, c2, dM)` with c1 = M / n, dM = colsum(g * u) / n, c2 = M dM / n^2 (0 with `detach_norm`).

    The pre-activation u is recovered from the saved output, `u = (y - b) / c1`, so
    colsum(g * u) / n = colsum(g * (y - b)) / M: the layer keeps no (T, out) tensor of its own. Rows
    with M == 0 have no recoverable u; their dM is non-finite and the optimizer skips the step.
    """
    acc = accumulation_dtype(grad_out.dtype)
    m = magnitude.to(acc)
    n = norm.to(acc)
    g = grad_out.to(acc)
    centred = out.to(acc)
    if bias is not None:
        centred = centred - bias.to(acc)
    grad_magnitude = (g * centred).sum(0) / m
    row_scale = m / n
    if detach_norm:
        c2 = torch.zeros_like(m)
    else:
        c2 = m * grad_magnitude / (n * n)
    return row_scale, c2, grad_magnitude


@norm_coefficients.custom_op.register_fake
def _(grad_out, out, bias, magnitude, norm, detach_norm):
    acc = accumulation_dtype(grad_out.dtype)
    rows = magnitude.shape[0]
    return tuple(magnitude.new_empty(rows, dtype=acc) for _ in range(3))


register_backend("norm_coefficients", "triton", "gradnormlorp_kernels.triton.norm_coefficients", "norm_coefficients")
