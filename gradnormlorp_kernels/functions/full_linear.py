import torch

from .. import ops


class FullLinearFunction(torch.autograd.Function):
    """y = (M / n) (x V^T) + b with n = ||V||_row, for x of shape (T, in)."""

    @staticmethod
    def forward(ctx, x, direction, bias, magnitude, detach_norm):
        norm = ops.row_norm(direction)
        row_scale = magnitude.to(norm.dtype) / norm
        out = ops.full_forward(x, direction, row_scale, bias)
        ctx.save_for_backward(x, out, direction, magnitude, norm, bias)
        ctx.detach_norm = detach_norm
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out, direction, magnitude, norm, bias = ctx.saved_tensors
        grad_x, grad_V, grad_M = ops.full_backward(
            grad_out.contiguous(), x, out, direction, magnitude, norm, bias, ctx.detach_norm
        )
        grad_bias = grad_out.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_V, grad_bias, grad_M, None
