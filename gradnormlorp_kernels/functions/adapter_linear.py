import torch

from .. import ops


class AdapterLinearFunction(torch.autograd.Function):
    """y = (M / n) (x W0^T + s (x A^T) B^T) + b for x of shape (T, in); W0 and b are frozen."""

    @staticmethod
    def forward(ctx, x, base_weight, bias, lora_A, lora_B, magnitude, scaling, detach_norm):
        norm, base_A = ops.adapter_row_norm(base_weight, lora_A, lora_B, scaling)
        row_scale = magnitude.to(norm.dtype) / norm
        out, x_A = ops.adapter_forward(x, base_weight, lora_A, lora_B, row_scale, scaling, None)
        # The backward recovers u = out / (M / n) from the saved output: without a bias that output is the
        # one the caller holds (no extra memory). With a bias, the pre-bias output is kept instead, since
        # recovering u from y - b cancels when |b| >> |u|.
        ctx.save_for_backward(x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm)
        ctx.scaling = scaling
        ctx.detach_norm = detach_norm
        ctx.has_bias = bias is not None
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm = ctx.saved_tensors
        grad_x, grad_A, grad_B, grad_M = ops.adapter_backward(
            grad_out.contiguous(), x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm, None,
            ctx.scaling, ctx.detach_norm,
        )
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, grad_M, None, None
