"""Full mode's projected gradient `P^T dV`, `dV Q` or `P^T dV Q` without the (out, in) gradient.

With gh = g * c1:  P^T dV = (gh P)^T x - (P * c2)^T V   and   dV Q = gh^T (x Q) - c2 * (V Q).
The same op with a random `right` gives the range finder's sketch `dV Omega`.
"""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import accumulation_dtype


@op("projected_grad")
def projected_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    direction: torch.Tensor,
    row_scale: torch.Tensor,
    c2: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
) -> torch.Tensor:
    if left is None and right is None:
        raise ValueError("projected_grad needs a `left` (out, r) or a `right` (in, r) projector, or both")
    acc = accumulation_dtype(x.dtype)
    g_scaled = grad_out.to(acc) * row_scale.to(acc)
    xs = x.to(acc)
    v = direction.to(acc)
    c2 = c2.to(acc)
    if left is not None:
        p = left.to(acc)
        g_scaled = g_scaled @ p  # (T, r)
        v = (p * c2[:, None]).T @ v  # (r, in)
        c2 = None
    if right is not None:
        q = right.to(acc)
        xs = xs @ q  # (T, k)
        v = v @ q
    first = g_scaled.T @ xs
    return first - v if c2 is None else first - c2[:, None] * v


@projected_grad.custom_op.register_fake
def _(grad_out, x, direction, row_scale, c2, left, right):
    acc = accumulation_dtype(x.dtype)
    rows = direction.shape[0] if left is None else left.shape[1]
    cols = direction.shape[1] if right is None else right.shape[1]
    return x.new_empty(rows, cols, dtype=acc)


def grad_sketch(grad_out, x, direction, row_scale, c2, omega):
    """`dV Omega` (out, k) for the randomized range finder, without the full gradient."""
    return projected_grad(grad_out, x, direction, row_scale, c2, None, omega)


register_backend("projected_grad", "triton", "gradnormlorp_kernels.triton.linear", "projected_grad")
