"""Adam's moments updated in place (8-bit block-wise or float32), returning the normalised direction.

A gradient with a non-finite element leaves every state untouched and returns a zero direction; the
step counter only counts finite steps and `skipped` counts the others, all on the device (no sync).
"""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from .quant8 import dequantize_blockwise, quantize_blockwise


@op(
    "adam_update",
    mutates_args=("exp_avg", "exp_avg_sq", "absmax_avg", "absmax_avg_sq", "step", "skipped"),
)
def adam_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    absmax_avg: Optional[torch.Tensor],
    absmax_avg_sq: Optional[torch.Tensor],
    code_signed: Optional[torch.Tensor],
    code_unsigned: Optional[torch.Tensor],
    step: torch.Tensor,
    skipped: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Update the moments of `grad` and return `m_hat / (sqrt(v_hat) + eps)` in float32 (float64 with
    float64 states).

    States are uint8 codes plus float32 absmax per block when `absmax_avg` is given, else float32 or float64.
    `step` and `skipped` are float32 0-d tensors.
    """
    g = grad.to(_compute_dtype(exp_avg))
    finite = torch.isfinite(g).all()
    g = torch.where(finite, g, torch.zeros_like(g))
    quantized = absmax_avg is not None
    if quantized:
        m = dequantize_blockwise(exp_avg, absmax_avg, code_signed)
        v = dequantize_blockwise(exp_avg_sq, absmax_avg_sq, code_unsigned)
    else:
        m, v = exp_avg, exp_avg_sq
    new_step = step + finite.to(step.dtype)
    m_new = torch.lerp(m, g, 1.0 - beta1)
    v_new = v * beta2 + (1.0 - beta2) * g * g
    bias1 = 1.0 - beta1**new_step
    bias2 = 1.0 - beta2**new_step
    # The bias corrections as two scalar factors (torch's Adam divides by sqrt(bias2) once too): one division
    # and one root an element, so the kernels' per-element arithmetic is as short as it can be.
    inverse_bias1 = bias1.to(m_new.dtype).reciprocal()
    inverse_root_bias2 = bias2.to(m_new.dtype).sqrt().reciprocal()
    direction = (m_new * inverse_bias1) / (v_new.sqrt() * inverse_root_bias2 + eps)
    direction = torch.where(finite, direction, torch.zeros_like(direction))

    if quantized:
        m_codes, m_absmax = quantize_blockwise(m_new, code_signed)
        v_codes, v_absmax = quantize_blockwise(v_new, code_unsigned)
        exp_avg.copy_(torch.where(finite, m_codes, exp_avg))
        exp_avg_sq.copy_(torch.where(finite, v_codes, exp_avg_sq))
        absmax_avg.copy_(torch.where(finite, m_absmax, absmax_avg))
        absmax_avg_sq.copy_(torch.where(finite, v_absmax, absmax_avg_sq))
    else:
        exp_avg.copy_(torch.where(finite, m_new, exp_avg))
        exp_avg_sq.copy_(torch.where(finite, v_new, exp_avg_sq))
    step.copy_(new_step)
    skipped.add_((~finite).to(skipped.dtype))
    return direction


def _compute_dtype(exp_avg: torch.Tensor) -> torch.dtype:
    return torch.float64 if exp_avg.dtype == torch.float64 else torch.float32


@adam_update.custom_op.register_fake
def _(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, step, skipped, b1, b2, eps):
    return torch.empty_like(grad, dtype=_compute_dtype(exp_avg))


register_backend("adam_update", "triton", "gradnormlorp_kernels.triton.adam_update", "adam_update")
register_backend("adam_update", "cpu", "gradnormlorp_kernels._extension", "cpu_adam_update")
register_backend("adam_update", "cuda", "gradnormlorp_kernels._extension", "cuda_adam_update")
