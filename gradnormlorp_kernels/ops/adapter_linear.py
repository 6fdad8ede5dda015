"""Adapter mode: `W = diag(M / n) (W0 + s B A)`, `y = x W^T + b`, and the closed-form backward (DESIGN.md 2)."""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import NORM_FLOOR, accumulation_dtype
from .norm_coefficients import norm_coefficients


@op("adapter_weight")
def adapter_weight(
    base_weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(W, n, W' A^T)` with W' = W0 + s B A, n = ||W'||_row and W = diag(M / n) W'.

    W is in W0's dtype (the forward is one GEMM on it, and `merge()` returns exactly it); n and W' A^T
    (out, r), which the backward's dB needs, are float32 (float64 for float64 input). W' itself exists only
    tile by tile in a kernel; here, in the reference, it is formed densely.
    """
    acc = accumulation_dtype(base_weight.dtype)
    a = lora_A.to(acc)
    merged = base_weight.to(acc) + scaling * (lora_B.to(acc) @ a)
    norm = torch.linalg.vector_norm(merged, dim=1).clamp_min(NORM_FLOOR)
    weight = merged * (magnitude.to(acc) / norm)[:, None]
    return weight.to(base_weight.dtype), norm, merged @ a.T


@adapter_weight.custom_op.register_fake
def _(base_weight, lora_A, lora_B, magnitude, scaling):
    acc = accumulation_dtype(base_weight.dtype)
    rows = base_weight.shape[0]
    return (
        torch.empty_like(base_weight),
        base_weight.new_empty(rows, dtype=acc),
        base_weight.new_empty(rows, lora_A.shape[0], dtype=acc),
    )


@op("adapter_backward")
def adapter_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    x_A: torch.Tensor,
    base_weight: torch.Tensor,
    weight_A: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    detach_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dx, dA, dB, dM)` from the saved output (no (T, out) pre-activation is kept), the forward's
    `x A^T` and `W' A^T` (`weight_A`, W' = W0 + s B A), and n. With gh = g * c1, c1 = M / n:

    dx = gh W0 + s (gh B) A                      (= g W)
    dB = s (gh^T (x A^T) - c2 * (W' A^T))
    dA = s ((gh B)^T x - (B * c2)^T W0 - s (B * c2)^T B A)
    """
    acc = accumulation_dtype(x.dtype)
    row_scale, c2, grad_magnitude = norm_coefficients(grad_out, out, bias, magnitude, norm, detach_norm)
    g_scaled = (grad_out.to(acc) * row_scale).to(x.dtype)
    g_B = g_scaled @ lora_B
    grad_x = g_scaled @ base_weight + scaling * (g_B @ lora_A)

    a = lora_A.to(acc)
    b = lora_B.to(acc)
    b_c2 = b * c2[:, None]
    grad_B = scaling * ((g_scaled.T @ x_A).to(acc) - c2[:, None] * weight_A.to(acc))
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
def _(grad_out, x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm, bias, scaling, detach_norm):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


register_backend("adapter_weight", "triton", "gradnormlorp_kernels.triton.linear", "adapter_weight")
register_backend("adapter_backward", "triton", "gradnormlorp_kernels.triton.linear", "adapter_backward")
