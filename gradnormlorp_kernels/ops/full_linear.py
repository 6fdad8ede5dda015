"""Full mode: `y = (M / n) * (x V^T) + b`, n = ||V||_row, and its closed-form backward (DESIGN.md 2)."""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import accumulation_dtype
from .norm_coefficients import norm_coefficients


@op("full_forward")
def full_forward(
    x: torch.Tensor, direction: torch.Tensor, row_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    y = (x @ direction.T).to(acc) * row_scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@full_forward.custom_op.register_fake
def _(x, direction, row_scale, bias):
    return x.new_empty(x.shape[0], direction.shape[0])


@op("full_backward")
def full_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    direction: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: Optional[torch.Tensor],
    detach_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, dV, dM)`: dx = gh V, dV = gh^T x - c2 * V with gh = g * M / n."""
    acc = accumulation_dtype(x.dtype)
    row_scale, c2, grad_magnitude = norm_coefficients(grad_out, out, bias, magnitude, norm, detach_norm)
    g_scaled = (grad_out.to(acc) * row_scale).to(x.dtype)
    grad_x = g_scaled @ direction
    grad_direction = (g_scaled.T @ x).to(acc) - c2[:, None] * direction.to(acc)
    return grad_x, grad_direction.to(direction.dtype), grad_magnitude.to(magnitude.dtype)


@full_backward.custom_op.register_fake
def _(grad_out, x, out, direction, magnitude, norm, bias, detach_norm):
    return torch.empty_like(x), torch.empty_like(direction), torch.empty_like(magnitude)


register_backend("full_forward", "triton", "gradnormlorp_kernels.triton.linear", "full_forward")
register_backend("full_backward", "triton", "gradnormlorp_kernels.triton.linear", "full_backward")
