"""The layer's forward and backward (both modes) and full mode's projected gradient, around cuBLAS GEMMs.

The normalised weight W = diag(M / n) (W0 + s B A) (adapter) or diag(M / n) V (full) costs a pass or two
over an (out, in) matrix, far fewer bytes than scaling a (T, out) activation when T >= in. So the forward is
one GEMM with the bias in its epilogue, y = x W^T + b, and the backward's dx = g W is one GEMM on the
raw upstream gradient (gh W0 + s (gh B) A == g W). The remaining terms read g and y once
(`column_pass`) plus thin GEMMs.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops._common import NORM_FLOOR
from ..ops.adapter_linear import adapter_backward as adapter_backward_op, adapter_weight as adapter_weight_op
from ..ops.full_linear import full_backward as full_backward_op, full_forward as full_forward_op
from ..ops.projected_grad import projected_grad as projected_grad_op
from .norm_coefficients import AdapterFactors, column_pass
from .row_norm import adapter_row_norm_partials, products_on_fma_units
from .rounding import _round_to, bitwise_bf16

# B A is formed in unrolled chunks of up to this many ranks; ranks up to it also get W' A^T finished by the
# weight kernel (registers hold a (rows, rank) tile and the (rank, rank) A A^T).
_RANK_CHUNK = 64


@triton.jit
def _lora_tile(a_ptr, b_ptr, row, col, row_mask, col_mask, rank, stride_a, stride_b,
               NATIVE_DOT: tl.constexpr, BLOCK_R: tl.constexpr, RANK_CHUNKS: tl.constexpr):
    """(B A)[row, col] in float32, over the rank in RANK_CHUNKS chunks of BLOCK_R, unrolled (a loop here
    would keep the caller's loop over columns from being software-pipelined)."""
    lora = tl.zeros((row.shape[0], col.shape[0]), dtype=tl.float32)
    for chunk in tl.static_range(RANK_CHUNKS):
        r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        b = tl.load(b_ptr + row[:, None] * stride_b + r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(a_ptr + r[:, None] * stride_a + col[None, :], mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        if NATIVE_DOT:
            lora += tl.dot(b, a)
        else:
            lora += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    return lora


@triton.jit
def _normalized_weight_kernel(
    w_ptr, a_ptr, b_ptr, magnitude_ptr, row_scale_ptr, out_ptr, squares_ptr, norm_ptr, partial_a_ptr, gram_ptr,
    weight_a_ptr, rows, cols, rank, splits, stride_w, stride_a, stride_b, stride_out, scaling, floor,
    HAS_LORA: tl.constexpr, WITH_NORM: tl.constexpr, WITH_WEIGHT_A: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BITWISE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, RANK_CHUNKS: tl.constexpr, STAGES: tl.constexpr,
):
    """out = c[:, None] * (W + s B A) for a strip of BLOCK_M whole rows, B A formed tile by tile in registers.

    WITH_NORM: c = M / n, n = ||W + s B A||_row from the `splits` partial sums of squares (written with n, and
    with WITH_WEIGHT_A, W' A^T = W A^T + s B (A A^T) from the partial W A^T and A A^T). Otherwise c is
    `row_scale`. Both ways the tiles are formed by the same instructions, so the backward, which rebuilds the
    weight from the forward's c, gets the forward's bits."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    if WITH_NORM:
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for split in range(splits):
            total += tl.load(squares_ptr + split * rows + row, mask=row_mask, other=0.0)
        norm = tl.maximum(tl.sqrt_rn(total), floor)
        # Correctly rounded (M / n is exactly 1 where M == n, as at init), as the backward's c1 is.
        scale = tl.div_rn(tl.load(magnitude_ptr + row, mask=row_mask, other=0.0).to(tl.float32), norm)
        tl.store(norm_ptr + row, norm, mask=row_mask)
        if WITH_WEIGHT_A:
            r = tl.arange(0, BLOCK_R)
            rank_mask = row_mask[:, None] & (r < rank)[None, :]
            weight_a = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for split in range(splits):
                weight_a += tl.load(partial_a_ptr + (split * rows + row[:, None]) * rank + r[None, :],
                                    mask=rank_mask, other=0.0)
            b = tl.load(b_ptr + row[:, None] * stride_b + r[None, :], mask=rank_mask, other=0.0).to(tl.float32)
            gram_mask = (r < rank)[:, None] & (r < rank)[None, :]
            gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
            for split in range(splits):
                gram += tl.load(gram_ptr + (split * rank + r[:, None]) * rank + r[None, :], mask=gram_mask, other=0.0)
            # 3xTF32 (float32 accuracy on tensor cores): the FMA product spilled at rank 64.
            weight_a += scaling * tl.dot(b, gram, input_precision="tf32x3")
            tl.store(weight_a_ptr + row[:, None] * rank + r[None, :], weight_a, mask=rank_mask)
    else:
        scale = tl.load(row_scale_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    for start in tl.range(0, cols, BLOCK_N, num_stages=STAGES):
        col = start + tl.arange(0, BLOCK_N)
        col_mask = col < cols
        mask = row_mask[:, None] & col_mask[None, :]
        value = tl.load(w_ptr + row[:, None] * stride_w + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_LORA:
            value += scaling * _lora_tile(a_ptr, b_ptr, row, col, row_mask, col_mask, rank, stride_a, stride_b,
                                          NATIVE_DOT, BLOCK_R, RANK_CHUNKS)
        value = _round_to(value * scale[:, None], out_ptr.dtype.element_ty, BITWISE_BF16)
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


# (BLOCK_M, BLOCK_N, num_warps, STAGES) of `_normalized_weight_kernel` (forward, backward's rebuild, full
# mode) at rank chunks of 16 and, by chunk, above; bench/time_normalized_weight.py --configs times the
# candidates (H200, 4096 x 4096 rebuild: r=32 19.5 us, r=64 26.3, against 35.1 and 40.8 at (16, 128, 8, 2)).
# At rank 64 the rank-32 tile, or four warps, spill on sm_90 (the forward's W' A^T prologue).
WEIGHT_CONFIG = (16, 512, 4, 4)
WIDE_RANK_WEIGHT_CONFIGS = {32: (32, 256, 4, 4), 64: (32, 128, 8, 4)}
# Shared memory of the float32 weight pass besides its pipeline buffers, at most (sm_90, Triton 3.6 and 3.9).
_WEIGHT_PASS_SCRATCH_BYTES = 16384


def weight_pass_stages(block_m, block_n, block_r, rank_chunks, element_size, stages, shared_bytes):
    """The most pipeline stages, up to `stages`, of a weight pass without tensor-core products (full mode's
    diag(c) V, float32 factors) that fit in `shared_bytes` a block. Each stage after the first buffers a W tile
    and the A and B chunks (float32 factors at rank 70, two chunks, asked for 304 KB, past sm_90's 227; full
    mode's float32 tile takes 32 KB a stage). The bf16 products do not stage through shared memory (17-33 KB at
    any depth), so they keep their tile's stages."""
    per_stage = (block_m * block_n + rank_chunks * block_r * (block_m + block_n)) * element_size
    return max(1, min(stages, 1 + (shared_bytes - _WEIGHT_PASS_SCRATCH_BYTES) // per_stage))


@functools.lru_cache(maxsize=None)
def _shared_bytes(device_index):
    """Shared memory a block may opt into on this GPU (227 KB on sm_90, 99 KB on sm_89), as Triton checks it."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _normalized_weight_launch(weight, lora_A, lora_B, magnitude, row_scale, scaling, dtype, config=None):
    """(W in `dtype`, n or None, W' A^T or None). `magnitude` given: adapter_row_norm's sweep over W0 first (per
    column range, the sums of squares of W' = W0 + s B A's rows and W0 A^T), then `_normalized_weight_kernel`
    with c = M / n, adding the ranges and, up to _RANK_CHUNK ranks, s B (A A^T) for W' A^T; else `row_scale`
    is c. `config`: the weight pass's tile."""
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    rows, cols = weight.shape
    device = weight.device
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    with_norm = magnitude is not None
    norm = torch.empty(rows, dtype=torch.float32, device=device) if with_norm else None
    has_lora = lora_A is not None
    rank = lora_A.shape[0] if has_lora else 0
    rank_block = max(16, triton.next_power_of_2(min(rank, _RANK_CHUNK)))
    with_weight_A = with_norm and rank <= rank_block
    weight_A = torch.empty(rows, rank, dtype=torch.float32, device=device) if with_norm else None
    if out.numel() == 0:
        return out, None if norm is None else norm.fill_(NORM_FLOOR), None if weight_A is None else weight_A.zero_()
    if has_lora:
        lora_A = lora_A if lora_A.stride(1) == 1 else lora_A.contiguous()
        lora_B = lora_B if lora_B.stride(1) == 1 else lora_B.contiguous()
    narrow = (torch.bfloat16, torch.float16)
    native = has_lora and weight.dtype in narrow and lora_A.dtype == lora_B.dtype == weight.dtype and \
        not triton_interpreted()
    unused = weight
    squares = partial_A = gram = unused
    splits = 0
    if with_norm:
        squares, partial_A, gram = adapter_row_norm_partials(weight, lora_A, lora_B, scaling, with_weight_A)
        gram = unused if gram is None else gram
        splits = squares.shape[0]
    block_m, block_n, warps, stages = config or WIDE_RANK_WEIGHT_CONFIGS.get(rank_block, WEIGHT_CONFIG)
    chunks = triton.cdiv(max(rank, 1), rank_block)
    if triton_interpreted():
        stages = 1
    elif not native:
        stages = weight_pass_stages(block_m, block_n, rank_block, chunks if has_lora else 0, weight.element_size(),
                                    stages, _shared_bytes(device.index))
    _normalized_weight_kernel[(triton.cdiv(rows, block_m),)](
        weight, lora_A if has_lora else unused, lora_B if has_lora else unused,
        magnitude if with_norm else unused, unused if with_norm else row_scale, out, squares,
        norm if with_norm else unused, partial_A, gram, weight_A if with_weight_A else unused, rows, cols, rank,
        splits, weight.stride(0), lora_A.stride(0) if has_lora else 0, lora_B.stride(0) if has_lora else 0,
        out.stride(0), float(scaling), NORM_FLOOR,
        HAS_LORA=has_lora, WITH_NORM=with_norm, WITH_WEIGHT_A=with_weight_A, NATIVE_DOT=native,
        BITWISE_BF16=bitwise_bf16(dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_block,
        RANK_CHUNKS=chunks, STAGES=stages,
        num_warps=warps,
    )
    if with_norm and not with_weight_A:
        a = lora_A.to(torch.float32)
        torch.sum(partial_A, 0, out=weight_A).addmm_(lora_B.to(torch.float32), a @ a.T, alpha=float(scaling))
    return out, norm, weight_A


def normalized_weight(weight, lora_A, lora_B, row_scale, scaling, dtype):
    """diag(row_scale) (weight + s B A) in `dtype` (`lora_A` None: diag(row_scale) weight)."""
    if lora_A is not None and products_on_fma_units(weight, lora_A, lora_B):
        # As the reference adapter_weight forms it, so the backward gets the forward's bits.
        merged = weight.to(torch.float32) + scaling * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
        return (merged * row_scale.to(torch.float32)[:, None]).to(dtype)
    return _normalized_weight_launch(weight, lora_A, lora_B, None, row_scale.contiguous(), scaling, dtype)[0]


def adapter_weight(base_weight, lora_A, lora_B, magnitude, scaling):
    """Same contract as the reference op; float64 takes the reference path. Two passes over W0: the norm
    sweep (adapter_row_norm's kernel: n's partial sums and W0 A^T, with W' A^T = W0 A^T + s B (A A^T) from the
    tiny A A^T, so the sweep forms one (rows, r) product, not two), then the weight pass writes W. One launch
    doing both held 208 registers a thread and ran at a third of the copy bandwidth (NOTES, thirteenth
    session); a norm pass forming (W0 + s B A) A^T tile by tile was bound by its three products (fourteenth).
    Products for the FMA units (float32) take the reference's dense path (`products_on_fma_units`)."""
    if base_weight.dtype == torch.float64 or products_on_fma_units(base_weight, lora_A, lora_B):
        return adapter_weight_op.reference(base_weight, lora_A, lora_B, magnitude, scaling)
    return _normalized_weight_launch(base_weight, lora_A, lora_B, magnitude.contiguous(), None, scaling,
                                     base_weight.dtype)


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


def adapter_backward(grad_out, x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm, bias, scaling,
                     detach_norm):
    """Same contract as the reference op; float64 takes the reference path.

    One pass over g and y gives c1, c2, dM, dB and the small factors s c1 B and s (c2 / c1) B; W is rebuilt
    from W0 and c1 (one pass over W0, the forward's bits) for dx = g W; then dA = (g (s c1 B))^T x -
    (s (c2 / c1) B)^T W, since (B c2)^T W' = (B c2 / c1)^T W: two thin cuBLAS GEMMs, the second (skipped
    when c2 == 0) accumulating onto the first. Few launches, since each costs the host tens of microseconds.
    """
    if x.dtype == torch.float64:
        return adapter_backward_op.reference(
            grad_out, x, out, x_A, base_weight, weight_A, lora_A, lora_B, magnitude, norm, bias, scaling, detach_norm
        )
    g = grad_out.to(x.dtype)
    factors = AdapterFactors(x_A, weight_A, lora_B, scaling, lora_B.dtype, x.dtype)
    row_scale, _, grad_magnitude = column_pass(
        g, out, bias, magnitude, norm, detach_norm, factors, grad_magnitude_dtype=magnitude.dtype
    )
    weight = normalized_weight(base_weight, lora_A, lora_B, row_scale, scaling, x.dtype)
    grad_x = g @ weight
    grad_A = (g @ factors.B_scaled).T @ x  # s (gh B)^T x, (r, in)
    if not detach_norm:
        grad_A.addmm_(factors.B_c2.T, weight, alpha=-1.0)
    return grad_x, grad_A.to(lora_A.dtype), factors.grad_B, grad_magnitude


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
