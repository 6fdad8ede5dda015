"""The layer's forward and backward (both modes) and full mode's projected gradient, around cuBLAS GEMMs.

The normalised weight W = diag(M / n) (W0 + s B A) (adapter) or diag(M / n) V (full) costs one pass over
an (out, in) matrix, far fewer bytes than scaling a (T, out) activation when T >= in. So the forward is
one GEMM with the bias in its epilogue, y = x W^T + b, and the backward's dx = g W is one GEMM on the
raw upstream gradient (gh W0 + s (gh B) A == g W). The remaining terms read g and y once
(`column_pass`) plus thin GEMMs.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops.adapter_linear import adapter_backward as adapter_backward_op, adapter_forward as adapter_forward_op
from ..ops.full_linear import full_backward as full_backward_op, full_forward as full_forward_op
from ..ops.projected_grad import projected_grad as projected_grad_op
from .norm_coefficients import AdapterFactors, column_pass
from .rounding import _round_to, bitwise_bf16


@triton.jit
def _normalized_weight_kernel(
    w_ptr, a_ptr, b_ptr, row_scale_ptr, out_ptr, rows, cols, rank,
    stride_w, stride_a, stride_b, stride_out, scaling,
    HAS_LORA: tl.constexpr, NATIVE_DOT: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = row_scale[:, None] * (W + s B A) for one tile, B A formed in registers (rank-r products)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < rows
    col_mask = col < cols
    mask = row_mask[:, None] & col_mask[None, :]
    value = tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r_start in range(0, rank, BLOCK_R):
            r = r_start + tl.arange(0, BLOCK_R)
            r_mask = r < rank
            b = tl.load(b_ptr + row[:, None] * stride_b + r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                        other=0.0)
            a = tl.load(a_ptr + r[:, None] * stride_a + col[None, :], mask=r_mask[:, None] & col_mask[None, :],
                        other=0.0)
            if NATIVE_DOT:
                lora += tl.dot(b, a)
            else:
                lora += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        value += scaling * lora
    row_scale = tl.load(row_scale_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    value = value * row_scale[:, None]
    value = _round_to(value, out_ptr.dtype.element_ty, BITWISE_BF16)
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], value, mask=mask)


@triton.jit
def _direction_grad_kernel(
    g_ptr, v_ptr, row_scale_ptr, c2_ptr, out_ptr, rows, cols, stride_g, stride_v, stride_out,
    BITWISE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dV = c1 * (g^T x) - c2 * V, one tile."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < rows
    mask = row_mask[:, None] & (col < cols)[None, :]
    g = tl.load(g_ptr + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] * stride_v + col[None, :], mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(row_scale_ptr + row, mask=row_mask, other=0.0)
    c2 = tl.load(c2_ptr + row, mask=row_mask, other=0.0)
    value = c1[:, None] * g - c2[:, None] * v
    value = _round_to(value, out_ptr.dtype.element_ty, BITWISE_BF16)
    tl.store(out_ptr + row[:, None] * stride_out + col[None, :], value, mask=mask)


@triton.jit
def _matmul_f32_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    NATIVE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C (float32) = A B with float32 accumulation and float32 (3xTF32) products for float32 operands;
    operands of any float dtype and strides are upcast in registers, never copied."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        # 64-bit offsets: the operands include (T, out) activations, possibly past 2^31 elements.
        a = tl.load(a_ptr + row[:, None].to(tl.int64) * stride_am + k[None, :].to(tl.int64) * stride_ak,
                    mask=(row < M)[:, None] & (k < K)[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None].to(tl.int64) * stride_bk + col[None, :] * stride_bn,
                    mask=(k < K)[:, None] & (col < N)[None, :], other=0.0)
        if NATIVE_DOT:
            acc += tl.dot(a, b)
        else:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    tl.store(c_ptr + row[:, None].to(tl.int64) * stride_cm + col[None, :], acc,
             mask=(row < M)[:, None] & (col < N)[None, :])


@triton.jit
def _lora_a_grad_kernel(
    p1_ptr, p2_ptr, k_ptr, a_ptr, out_ptr, rank, cols, stride_p1, stride_p2, stride_a, scaling,
    DETACH: tl.constexpr, BITWISE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA = s (P1 - P2 - s K A) for a block of columns, P1 = (gh B)^T x, P2 = (B c2)^T W0, K = (B c2)^T B
    (DETACH: c2 = 0, dA = s P1)."""
    r = tl.arange(0, BLOCK_R)
    col = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = r < rank
    mask = r_mask[:, None] & (col < cols)[None, :]
    value = tl.load(p1_ptr + r[:, None] * stride_p1 + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if not DETACH:
        value -= tl.load(p2_ptr + r[:, None] * stride_p2 + col[None, :], mask=mask, other=0.0).to(tl.float32)
        k_a = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for inner_start in range(0, rank, BLOCK_K):  # K A in slices of K's columns: no (r, r) tile in registers
            inner = inner_start + tl.arange(0, BLOCK_K)
            inner_mask = inner < rank
            k = tl.load(k_ptr + r[:, None] * rank + inner[None, :], mask=r_mask[:, None] & inner_mask[None, :],
                        other=0.0)
            a = tl.load(a_ptr + inner[:, None] * stride_a + col[None, :],
                        mask=inner_mask[:, None] & (col < cols)[None, :], other=0.0).to(tl.float32)
            k_a += tl.dot(k, a, input_precision="ieee")
        value -= scaling * k_a
    value = _round_to(scaling * value, out_ptr.dtype.element_ty, BITWISE_BF16)
    tl.store(out_ptr + r[:, None] * cols + col[None, :], value, mask=mask)


def normalized_weight(weight, lora_A, lora_B, row_scale, scaling, dtype):
    """diag(row_scale) (weight + s B A) in `dtype` (`lora_A` None: diag(row_scale) weight)."""
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    if out.numel() == 0:
        return out
    has_lora = lora_A is not None
    if has_lora:
        lora_A = lora_A.contiguous()
        lora_B = lora_B.contiguous()
    native = (has_lora and lora_A.dtype == lora_B.dtype and lora_A.dtype in (torch.bfloat16, torch.float16)
              and not triton_interpreted())
    block_m, block_n = 32, 128
    _normalized_weight_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
        weight, lora_A if has_lora else weight, lora_B if has_lora else weight, row_scale.contiguous(), out,
        rows, cols, lora_A.shape[0] if has_lora else 0,
        weight.stride(0), lora_A.stride(0) if has_lora else 0, lora_B.stride(0) if has_lora else 0, out.stride(0),
        float(scaling), HAS_LORA=has_lora, NATIVE_DOT=native, BITWISE_BF16=bitwise_bf16(dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=16, num_warps=8,
    )
    return out


def matmul_f32(a, b):
    """float32 (M, N) = a (M, K) @ b (K, N) accumulated and multiplied in float32, for the thin GEMMs whose
    float32 result must not pass through a bf16 rounding (views such as transposes are read in place)."""
    (rows, inner), cols = a.shape, b.shape[1]
    out = torch.empty(rows, cols, dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out.zero_()
    native = (a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and not triton_interpreted())
    block_m, block_n = (32 if rows <= 32 else 64), (32 if cols <= 32 else 64)
    _matmul_f32_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
        a, b, out, rows, cols, inner, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        NATIVE_DOT=native, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, num_warps=4,
    )
    return out


def _linear(x, weight, bias):
    """x W^T + b, the bias added in the GEMM's epilogue when it shares x's dtype."""
    if bias is None or bias.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return ((x @ weight.T).to(torch.float32) + bias.to(torch.float32)).to(x.dtype)


def adapter_forward(x, base_weight, lora_A, lora_B, row_scale, scaling, bias):
    """Same contract as the reference op; float64 takes the reference path."""
    if x.dtype == torch.float64:
        return adapter_forward_op.reference(x, base_weight, lora_A, lora_B, row_scale, scaling, bias)
    weight = normalized_weight(base_weight, lora_A, lora_B, row_scale, scaling, x.dtype)
    return _linear(x, weight, bias), x @ lora_A.to(x.dtype).T


def adapter_backward(grad_out, x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm, bias, scaling,
                     detach_norm):
    """Same contract as the reference op; float64 takes the reference path.

    One pass over g and y gives c1, c2, dM and dB; dx = g W with W rebuilt from W0 (one pass over W0);
    gh B = g (c1 B) and (gh B)^T x are thin GEMMs, (B c2)^T W0 one more (skipped when c2 == 0), and
    one small kernel combines dA: few launches, since each costs microseconds at this layer's scale.
    """
    if x.dtype == torch.float64:
        return adapter_backward_op.reference(
            grad_out, x, out, x_A, base_weight, base_A, lora_A, lora_B, magnitude, norm, bias, scaling, detach_norm
        )
    g = grad_out.to(x.dtype)
    factors = AdapterFactors(
        x_A, base_A, lora_B, None if detach_norm else matmul_f32(lora_A, lora_A.T), scaling, lora_B.dtype, x.dtype,
        base_weight.dtype,
    )
    row_scale, c2, grad_magnitude = column_pass(
        g, out, bias, magnitude, norm, detach_norm, factors, grad_magnitude_dtype=magnitude.dtype
    )
    grad_x = g @ normalized_weight(base_weight, lora_A, lora_B, row_scale, scaling, x.dtype)
    g_B = g @ factors.B_scaled  # gh B, (T, r)
    first = g_B.T @ x  # (r, in)
    rank, cols = lora_A.shape
    grad_A = torch.empty(rank, cols, dtype=lora_A.dtype, device=x.device)
    if detach_norm:
        second, gram = first, first  # unused pointers
    else:
        second = factors.B_c2_low.T @ base_weight  # (B c2)^T W0, (r, in)
        gram = matmul_f32(factors.B_c2.T, lora_B)  # (B c2)^T B, (r, r)
    a_arg = lora_A if lora_A.stride(1) == 1 else lora_A.contiguous()
    if grad_A.numel():
        block_r = max(16, triton.next_power_of_2(rank))
        block_n, warps = (128, 4) if block_r <= 32 else (32, 8)  # spill-free tiles (sm_90 resource report)
        _lora_a_grad_kernel[(triton.cdiv(cols, block_n),)](
            first, second, gram, a_arg, grad_A, rank, cols, first.stride(0), second.stride(0), a_arg.stride(0),
            float(scaling), DETACH=bool(detach_norm), BITWISE_BF16=bitwise_bf16(lora_A.dtype),
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=16, num_warps=warps,
        )
    return grad_x, grad_A, factors.grad_B, grad_magnitude


def full_forward(x, direction, row_scale, bias):
    """Same contract as the reference op; float64 takes the reference path."""
    if x.dtype == torch.float64:
        return full_forward_op.reference(x, direction, row_scale, bias)
    return _linear(x, normalized_weight(direction, None, None, row_scale, 0.0, x.dtype), bias)


def full_backward(grad_out, x, out, direction, magnitude, norm, bias, detach_norm):
    """Same contract as the reference op; float64 takes the reference path.

    dx = g W (W = diag(c1) V, one pass over V); dV = c1 * (g^T x) - c2 * V fused into one pass over the
    cuBLAS product g^T x."""
    if x.dtype == torch.float64:
        return full_backward_op.reference(grad_out, x, out, direction, magnitude, norm, bias, detach_norm)
    g = grad_out.to(x.dtype)
    row_scale, c2, grad_magnitude = column_pass(g, out, bias, magnitude, norm, detach_norm,
                                                grad_magnitude_dtype=magnitude.dtype)
    grad_x = g @ normalized_weight(direction, None, None, row_scale, 0.0, x.dtype)
    product = g.T @ x
    direction = direction if direction.stride(1) == 1 else direction.contiguous()
    rows, cols = direction.shape
    grad_direction = torch.empty_like(direction)
    if grad_direction.numel():
        block_m, block_n = 16, 256
        _direction_grad_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))](
            product, direction, row_scale, c2, grad_direction, rows, cols,
            product.stride(0), direction.stride(0), grad_direction.stride(0),
            BITWISE_BF16=bitwise_bf16(direction.dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    return grad_x, grad_direction, grad_magnitude


def projected_grad(grad_out, x, direction, row_scale, c2, left, right):
    """Same contract as the reference op; float64 takes the reference path.

    P^T dV = (g (c1 P))^T x - (c2 P)^T V and dV Q = c1 * (g^T (x Q)) - c2 * (V Q): thin GEMMs that read
    each big operand once, in float32 arithmetic like the reference, with no (T, out) or (out, in) temporary."""
    if x.dtype == torch.float64:
        return projected_grad_op.reference(grad_out, x, direction, row_scale, c2, left, right)
    if left is None and right is None:
        raise ValueError("projected_grad needs a `left` (out, r) or a `right` (in, r) projector, or both")
    row_scale = row_scale.to(torch.float32)
    c2 = c2.to(torch.float32)
    if left is not None:
        p = left.to(torch.float32)
        g_P = matmul_f32(grad_out, p * row_scale[:, None])  # gh P, (T, r)
        v_part = matmul_f32((p * c2[:, None]).T, direction)  # (r, in)
        if right is None:
            return matmul_f32(g_P.T, x) - v_part
        q = right.to(torch.float32)
        return matmul_f32(g_P.T, matmul_f32(x, q)) - matmul_f32(v_part, q)
    q = right.to(torch.float32)
    first = matmul_f32(grad_out.T, matmul_f32(x, q)) * row_scale[:, None]
    return first - c2[:, None] * matmul_f32(direction, q)
