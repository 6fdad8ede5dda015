"""Row norms of the weight: `||V||_row` (full mode) and `||W0 + s B A||_row` without forming it (adapter)."""

import torch

from .._dispatch import op, register_backend
from ._common import NORM_FLOOR, accumulation_dtype


@op("row_norm")
def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """`||weight[o, :]||_2` for every row, in float32 (float64 for float64 input)."""
    acc = accumulation_dtype(weight.dtype)
    return torch.linalg.vector_norm(weight.to(acc), dim=1).clamp_min(NORM_FLOOR)


@row_norm.custom_op.register_fake
def _(weight):
    return weight.new_empty(weight.shape[0], dtype=accumulation_dtype(weight.dtype))


@op("adapter_row_norm")
def adapter_row_norm(
    base_weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms of `W0 + s B A` and the product `W0 A^T` (which the backward needs), in one read of W0.

    n^2 = ||W0||_row^2 + 2 s rowsum(B * (W0 A^T)) + s^2 rowsum((B (A A^T)) * B)
    """
    acc = accumulation_dtype(base_weight.dtype)
    w0 = base_weight.to(acc)
    a = lora_A.to(acc)
    b = lora_B.to(acc)
    base_A = w0 @ a.T
    squared = (
        w0.square().sum(1)
        + (2.0 * scaling) * (b * base_A).sum(1)
        + (scaling * scaling) * ((b @ (a @ a.T)) * b).sum(1)
    )
    # Cancellation can leave a tiny negative where the true value is ~0.
    return squared.clamp_min(0.0).sqrt().clamp_min(NORM_FLOOR), base_A


@adapter_row_norm.custom_op.register_fake
def _(base_weight, lora_A, lora_B, scaling):
    acc = accumulation_dtype(base_weight.dtype)
    out = base_weight.shape[0]
    return (
        base_weight.new_empty(out, dtype=acc),
        base_weight.new_empty(out, lora_A.shape[0], dtype=acc),
    )


register_backend("row_norm", "triton", "gradnormlorp_kernels.triton.row_norm", "row_norm")
register_backend("adapter_row_norm", "triton", "gradnormlorp_kernels.triton.row_norm", "adapter_row_norm")
register_backend("row_norm", "cpu", "gradnormlorp_kernels._extension", "cpu_row_norm")
register_backend("row_norm", "cuda", "gradnormlorp_kernels._extension", "cuda_row_norm")
register_backend("adapter_row_norm", "cpu", "gradnormlorp_kernels._extension", "cpu_adapter_row_norm")
register_backend("adapter_row_norm", "cuda", "gradnormlorp_kernels._extension", "cuda_adapter_row_norm")
