"""`adam_update` of many tensors at once: their gradients and states laid end to end in flat buffers.

An optimizer step over a few dozen matrices is a few dozen small Adam launches (each with its finiteness
check and bias corrections) whose latency, not their bytes, sets the time. Here every tensor is a segment
of one flat buffer, so the whole group is one check and one update, each segment still decided alone: a
segment whose gradient has a non-finite element leaves its states untouched and gets a zero direction.
"""

from typing import Optional

import torch

from .._dispatch import op, register_backend
from .adam_update import adam_update
from .quant8 import BLOCK_SIZE, num_blocks


def segment_layout(numels: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Segments for tensors of `numels` elements laid end to end, each starting on a quantisation block:
    (starts, numels) as int64 tensors on `device` and the flat length they need."""
    starts, total = [], 0
    for numel in numels:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numels must be non-negative integers, got {numel!r}")
        starts.append(total)
        total += num_blocks(numel) * BLOCK_SIZE
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64).to(device)  # noqa: E731
    return as_tensor(starts), as_tensor(list(numels)), total


def check_segments(flat_numel: int, starts: torch.Tensor, numels: torch.Tensor) -> None:
    """Raise ValueError unless the segments are ascending, block-aligned, disjoint and inside the buffer
    (reads them on the host: a synchronisation on a GPU)."""
    if starts.dtype != torch.int64 or numels.dtype != torch.int64 or starts.dim() != 1 or starts.shape != numels.shape:
        raise ValueError(
            f"starts and numels must be 1-D int64 tensors of one length, got {starts.dtype} {tuple(starts.shape)} "
            f"and {numels.dtype} {tuple(numels.shape)}"
        )
    end = 0
    for index, (start, numel) in enumerate(zip(starts.tolist(), numels.tolist())):
        if start % BLOCK_SIZE or start < end or numel < 0 or start + numel > flat_numel:
            raise ValueError(
                f"segment {index} (start {start}, numel {numel}) must start on a multiple of {BLOCK_SIZE}, after "
                f"the previous segment's end ({end}), and end inside the flat buffer of {flat_numel} elements"
            )
        end = start + numel


@op(
    "segmented_adam_update",
    mutates_args=("exp_avg", "exp_avg_sq", "absmax_avg", "absmax_avg_sq", "step", "skipped"),
)
def segmented_adam_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    absmax_avg: Optional[torch.Tensor],
    absmax_avg_sq: Optional[torch.Tensor],
    code_signed: Optional[torch.Tensor],
    code_unsigned: Optional[torch.Tensor],
    starts: torch.Tensor,
    numels: torch.Tensor,
    step: torch.Tensor,
    skipped: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """For each segment i, `adam_update` of grad[starts[i] : starts[i] + numels[i]] with that slice of the
    states (8-bit: absmax from block starts[i] / BLOCK_SIZE on), `step[i]` and `skipped[i]`; returns the flat
    directions times `scale` (a 0-d float32 tensor), rounded to `out_dtype`. Elements outside every segment
    are neither read nor written (the output there is undefined).

    grad and the states are flat (1-D) and contiguous; starts are multiples of BLOCK_SIZE, ascending, and the
    segments disjoint (`segment_layout` makes such a layout). step and skipped are float32 of one element
    per segment.
    """
    _check_args(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, starts, numels, step, skipped, scale)
    check_segments(grad.numel(), starts, numels)
    out = torch.zeros(grad.shape, dtype=out_dtype, device=grad.device)
    quantized = absmax_avg is not None
    for index, (start, numel) in enumerate(zip(starts.tolist(), numels.tolist())):
        span = slice(start, start + numel)
        blocks = slice(start // BLOCK_SIZE, start // BLOCK_SIZE + num_blocks(numel))
        direction = adam_update.reference(
            grad[span], exp_avg[span], exp_avg_sq[span],
            absmax_avg[blocks] if quantized else None, absmax_avg_sq[blocks] if quantized else None,
            code_signed, code_unsigned, step[index], skipped[index], beta1, beta2, eps,
        )
        out[span] = (direction * scale.to(torch.float32)).to(out_dtype)
    return out


def _check_args(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, starts, numels, step, skipped, scale) -> None:
    """Checks that need no synchronisation (shapes, dtypes, devices): every backend makes them."""
    if grad.dim() != 1:
        raise ValueError(f"grad must be a flat (1-D) buffer, got shape {tuple(grad.shape)}")
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if state.shape != grad.shape or not state.is_contiguous():
            raise ValueError(f"{name} must be contiguous with grad's shape {tuple(grad.shape)}, got {tuple(state.shape)}")
    if (absmax_avg is None) != (absmax_avg_sq is None):
        raise ValueError("absmax_avg and absmax_avg_sq must both be given (8-bit states) or both be None")
    if absmax_avg is not None:
        blocks = num_blocks(grad.numel())
        for name, absmax in (("absmax_avg", absmax_avg), ("absmax_avg_sq", absmax_avg_sq)):
            if absmax.shape != (blocks,) or absmax.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 of shape ({blocks},), got {absmax.dtype} {tuple(absmax.shape)}")
    segments = starts.shape
    for name, counter in (("step", step), ("skipped", skipped)):
        if counter.shape != segments or counter.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape {tuple(segments)} (one per segment), got "
                             f"{counter.dtype} {tuple(counter.shape)}")
    # The kernels index these as dense arrays.
    for name, tensor in (("step", step), ("skipped", skipped), ("starts", starts), ("numels", numels),
                         ("absmax_avg", absmax_avg), ("absmax_avg_sq", absmax_avg_sq)):
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if scale.dim() != 0 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a 0-d float32 tensor, got {scale.dtype} of shape {tuple(scale.shape)}")
    devices = {t.device for t in (grad, exp_avg, exp_avg_sq, starts, numels, step, skipped, scale)}
    if len(devices) != 1:
        raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")


@segmented_adam_update.custom_op.register_fake
def _(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, starts, numels, step,
      skipped, beta1, beta2, eps, scale, out_dtype):
    return torch.empty(grad.shape, dtype=out_dtype, device=grad.device)


register_backend("segmented_adam_update", "triton", "gradnormlorp_kernels.triton.segmented_adam_update",
                 "segmented_adam_update")
