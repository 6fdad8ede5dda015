"""The optimizer's projection of a gradient onto its low-rank subspace: `P^T G`, `G Q` or `P^T G Q`.

Like torch.matmul on same-dtype inputs: products accumulated in float32 (float64 for float64), one
rounding to the gradient's dtype at the end (the two-sided product keeps its intermediate in float32).
"""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import accumulation_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_project_grad_args(grad, left, right) -> None:
    """ValueError naming the bad argument and what is allowed (shared by every backend and the fake)."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 2:
        got = f"shape {tuple(grad.shape)}" if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"project_grad: grad must be a 2-D (m, n) tensor, got {got}")
    if grad.dtype not in FLOAT_DTYPES:
        raise ValueError(f"project_grad: grad's dtype must be one of {FLOAT_DTYPES}, got {grad.dtype}")
    if left is None and right is None:
        raise ValueError("project_grad: needs `left` (m, r), `right` (n, r) or both; got neither")
    for name, proj, dim in (("left", left, 0), ("right", right, 1)):
        if proj is None:
            continue
        size = "m" if dim == 0 else "n"
        if not isinstance(proj, torch.Tensor):
            raise ValueError(f"project_grad: {name} must be a tensor or None, got {type(proj).__name__}")
        if proj.dim() != 2 or proj.shape[0] != grad.shape[dim]:
            raise ValueError(
                f"project_grad: {name} must be a 2-D ({size}, r) tensor with {size} = grad.shape[{dim}] = "
                f"{grad.shape[dim]}, got shape {tuple(proj.shape)}"
            )
        if proj.dtype != grad.dtype:
            raise ValueError(f"project_grad: {name} must have grad's dtype {grad.dtype}, got {proj.dtype}")
        if proj.device != grad.device:
            raise ValueError(f"project_grad: {name} must be on grad's device {grad.device}, got {proj.device}")


def project_grad_shape(grad, left, right) -> tuple:
    rows = grad.shape[0] if left is None else left.shape[1]
    cols = grad.shape[1] if right is None else right.shape[1]
    return rows, cols


@op("project_grad")
def project_grad(grad: torch.Tensor, left: Optional[torch.Tensor], right: Optional[torch.Tensor]) -> torch.Tensor:
    """`left^T grad` (r, n), `grad right` (m, r) or `left^T grad right` (r, r'), in grad's dtype."""
    check_project_grad_args(grad, left, right)
    acc = accumulation_dtype(grad.dtype)
    result = grad.to(acc)
    if left is not None:
        result = left.to(acc).T @ result
    if right is not None:
        result = result @ right.to(acc)
    return result.to(grad.dtype)


@project_grad.custom_op.register_fake
def _(grad, left, right):
    check_project_grad_args(grad, left, right)
    return grad.new_empty(project_grad_shape(grad, left, right))


register_backend("project_grad", "triton", "gradnormlorp_kernels.triton.project_grad", "project_grad")
