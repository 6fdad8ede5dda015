import torch
import torch.nn.functional as F

from .. import ops


class AdapterLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = diag(M / n) (W0 + s B A), for x of shape (T, in); W0 and b are frozen."""

    @staticmethod
    def forward(ctx, x, base_weight, bias, lora_A, lora_B, magnitude, scaling, detach_norm):
        # W exists only for this GEMM: the backward rebuilds it (one pass over W0) rather than keep a copy
        # of every adapted weight alive between a model's forward and backward.
        weight, norm, weight_A = ops.adapter_weight(base_weight, lora_A, lora_B, magnitude, scaling)
        out = F.linear(x, weight)
        x_A = x @ lora_A.T
        # The backward recovers u = out / (M / n) from the saved output: without a bias that output is the
        # one the caller holds (no extra memory). With a bias, the pre-bias output is kept instead, since
        # recovering u from y - b cancels when |b| >> |u|.
        ctx.save_for_backward(x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm)
        ctx.scaling = scaling
        ctx.detach_norm = detach_norm
        ctx.has_bias = bias is not None
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm = ctx.saved_tensors
        grad_x, grad_A, grad_B, grad_M = ops.adapter_backward(
            grad_out.contiguous(), x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm, None,
            ctx.scaling, ctx.detach_norm,
        )
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, grad_M, None, None
