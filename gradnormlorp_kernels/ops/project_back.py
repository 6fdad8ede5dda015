"""Project the Adam direction back, update the weight in place (with decoupled decay) and return new row norms."""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from ._common import NORM_FLOOR, accumulation_dtype


@op("project_back_update", mutates_args=("weight",))
def project_back_update(
    weight: torch.Tensor,
    direction: torch.Tensor,
    left: Optional[torch.Tensor],
    right: Optional[torch.Tensor],
    step_size: float,
    decay: float,
    gate: torch.Tensor,
    with_norm: bool = True,
    direction_gated: bool = False,
) -> torch.Tensor:
    """W <- W (1 - gate * decay) - gate * step_size * (P N Q^T); returns ||W||_row (float32), or an empty
    tensor when `with_norm` is False (a caller that will not use the norms saves a pass over W).
    `direction_gated`: N is already multiplied by the gate (and may be in W's dtype), which then only
    scales the decay: W <- W (1 - gate * decay) - step_size * (P N Q^T).

    `left` (out, r) and/or `right` (in, r) may be absent (that side is not projected). `gate` is a
    0-d float tensor, 0 for a skipped (non-finite) step, so nothing here waits on the host.
    """
    acc = accumulation_dtype(weight.dtype)
    update = direction.to(acc)
    if left is not None:
        update = left.to(acc) @ update
    if right is not None:
        update = update @ right.to(acc).T
    gate = gate.to(acc)
    update_scale = step_size if direction_gated else gate * step_size
    new = weight.to(acc) * (1.0 - gate * decay) - update_scale * update
    weight.copy_(new)
    if not with_norm:
        return weight.new_empty(0, dtype=acc)
    return torch.linalg.vector_norm(weight.to(acc), dim=1).clamp_min(NORM_FLOOR)


@project_back_update.custom_op.register_fake
def _(weight, direction, left, right, step_size, decay, gate, with_norm=True, direction_gated=False):
    return weight.new_empty(weight.shape[0] if with_norm else 0, dtype=accumulation_dtype(weight.dtype))


register_backend("project_back_update", "triton", "gradnormlorp_kernels.triton.project_back", "project_back_update")
register_backend("project_back_update", "cpu", "gradnormlorp_kernels._extension", "cpu_project_back_update")
register_backend("project_back_update", "cuda", "gradnormlorp_kernels._extension", "cuda_project_back_update")
