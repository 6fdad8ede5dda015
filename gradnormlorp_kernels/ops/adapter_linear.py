"""Adapter mode: `y = (M / n) * (x W0^T + s (x A^T) B^T) + b` and its closed-form backward (DESIGN.md 2)."""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import accumulation_dtype
from .norm_coefficients import norm_coefficients


@op("adapter_forward")
def adapter_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    row_scale: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `y` (T, out) and `x A^T` (T, r), which the backward needs. `row_scale` is M / n."""
    acc = accumulation_dtype(x.dtype)
    x_A = x @ lora_A.T
    u = (x @ base_weight.T).to(acc) + scaling * (x_A @ lora_B.T).to(acc)
    y = u * row_scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), x_A


@adapter_forward.custom_op.register_fake
def _(x, base_weight, lora_A, lora_B, row_scale, scaling, bias):
    return x.new_empty(x.shape[0], base_weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@op("adapter_backward")
def adapter_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    x_A: torch.Tensor,
    base_weight: torch.Tensor,
    base_A: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    detach_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dx, dA, dB, dM)` from the saved output (no (T, out) pre-activation is kept).

    dx = gh W0 + s (gh B) A,  gh = g * M / n
    dB = s (gh^T (x A^T) - c2 * (W0 A^T + s B (A A^T)))
    dA = s ((B^T gh^T) x - (B * c2)^T W0 - s (B * c2)^T B A)
    """
    acc = accumulation_dtype(x.dtype)
    row_scale, c2, grad_magnitude = norm_coefficients(grad_out, out, bias, magnitude, norm, detach_norm)
    g_scaled = (grad_out.to(acc) * row_scale).to(x.dtype)
    g_B = g_scaled @ lora_B
    grad_x = g_scaled @ base_weight + scaling * (g_B @ lora_A)

    a = lora_A.to(acc)
    b = lora_B.to(acc)
    b_c2 = b * c2[:, None]
    grad_B = scaling * ((g_scaled.T @ x_A).to(acc) - c2[:, None] * (base_A + scaling * (b @ (a @ a.T))))
    grad_A = scaling * (
        (g_B.T @ x).to(acc) - (b_c2.T.to(base_weight.dtype) @ base_weight).to(acc) - scaling * (b_c2.T @ b) @ a
    )
    return (
        grad_x.to(x.dtype),
        grad_A.to(lora_A.dtype),
        grad_B.to(lora_B.dtype),
        grad_magnitude.to(magnitude.dtype),
    )


@adapter_backward.custom_op.register_fake
def _(grad_out, x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm, bias, scaling, detach_norm):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


register_backend("adapter_forward", "triton", "gradnormlorp_kernels.triton.linear", "adapter_forward")
register_backend("adapter_backward", "triton", "gradnormlorp_kernels.triton.linear", "adapter_backward")
