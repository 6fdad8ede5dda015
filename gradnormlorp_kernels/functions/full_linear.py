import torch

from .. import ops


class FullLinearFunction(torch.autograd.Function):
    """y = (M / n) (x V^T) + b with n = ||V||_row, for x of shape (T, in)."""

    @staticmethod
    def forward(ctx, x, direction, bias, magnitude, detach_norm):
        norm = ops.row_norm(direction)
        row_scale = magnitude.to(norm.dtype) / norm
        out = ops.full_forward(x, direction, row_scale, None)
        # As in the adapter Function: the pre-bias output is saved, so u = out / (M / n) is exact.
        ctx.save_for_backward(x, out, direction, magnitude, norm)
        ctx.detach_norm = detach_norm
        ctx.has_bias = bias is not None
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, out, direction, magnitude, norm = ctx.saved_tensors
        grad_x, grad_V, grad_M = ops.full_backward(
            grad_out.contiguous(), x, out, direction, magnitude, norm, None, ctx.detach_norm
        )
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_V, grad_bias, grad_M, None
