"""`P^T G`, `G Q`, `P^T G Q`: thin GEMMs over a long reduction, split-K and deterministic.

cuBLAS falls back to a slow kernel when the gradient's rows are not 16-byte aligned (LLaMA's down
projection, 2048 x 5461 bf16: 56 us for P^T G at r = 128 on an H100, where reading G takes ~7.5 us).
Here one GEMM C (M, N) = A (M, K) @ B (K, N) with arbitrary strides covers both sides: P^T G is
A = P^T (a view), B = G; G Q is A = G, B = Q. The output has few tiles (r is small), so the long
reduction K is split: stage 1 gives each (tile, split) program its own float32 partial in a workspace
(splits, M, N); stage 2 sums the partials in split order and rounds once. No atomics: the same shape
and dtype give the same bits on every call (CUDA-graph replays are compared with eager bit for bit).
With a single split stage 1 rounds and stores the result itself.

The tile is chosen from the shape and dtype alone (no timing), so the summation order, and with it
the bits, are also the same in every process; `CONFIGS` lists the alternatives that bench/time_projection.py
times on a GPU.
"""

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops.aligned_rows import needs_alignment
from ..ops.project_grad import (
    check_project_grad_args,
    project_grad as project_grad_op,
    project_grad_shape,
)
from .aligned_rows import aligned_rows
from .rounding import _round_to, bitwise_bf16


@triton.jit
def _split_k_kernel(
    a_ptr, b_ptr, c_ptr, M, N, n_load, K, k_per_split, stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm,
    M_FASTEST: tl.constexpr, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[split] (or C itself, one split) = A[:, ks] @ B[ks, :] for one (BLOCK_M, BLOCK_N) tile, ks this
    program's range of K. The projector's tile index varies fastest (M_FASTEST: M is the projector's
    rank), so the programs that share a tile of the gradient run together and re-read it from L2. B's columns
    are read up to `n_load` >= N: a padded B (`aligned_rows`) is read whole rows at a time, with vector loads."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if M_FASTEST:
        tiles_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % tiles_m
        pid_n = pid // tiles_m
    else:
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_n = pid % tiles_n
        pid_m = pid // tiles_n
    row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row < M
    col_mask = col < N
    load_col_mask = col < n_load
    # 64-bit offsets along the gradient's long dimensions.
    a_rows = a_ptr + row.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + col.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * k_per_split
    for start in range(first, tl.minimum(first + k_per_split, K), BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        k64 = k.to(tl.int64)
        a = tl.load(a_rows + k64[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k64[:, None] * stride_bk, mask=k_mask[:, None] & load_col_mask[None, :], other=0.0)
        if NATIVE_DOT:  # bf16/fp16 products are exact in the float32 accumulator
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    value = _round_to(acc, c_ptr.dtype.element_ty, BITWISE_BF16)
    c = c_ptr + split.to(tl.int64) * stride_cs + row.to(tl.int64)[:, None] * stride_cm + col[None, :]
    tl.store(c, value, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, splits, BITWISE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over s of partial[s] (contiguous (splits, numel) float32), added in order s = 0, 1, ..."""
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offset < numel
    total = tl.load(partial_ptr + offset, mask=mask, other=0.0)
    for s in range(1, splits):
        total += tl.load(partial_ptr + s * numel + offset, mask=mask, other=0.0)
    tl.store(out_ptr + offset, _round_to(total, out_ptr.dtype.element_ty, BITWISE_BF16), mask=mask)


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# BLOCK_R tiles the projector's rank, BLOCK_L the gradient's other (long) dimension. Tensor-core tiles for
# bf16/fp16 (128 x 64 x 64 keeps a 64-register float32 accumulator per thread at 4 warps, four 24 KB stages
# of shared memory); float32 products run exact on the FMA units (input_precision="ieee"): smaller tiles.
CONFIGS = [
    _config(4, 4, BLOCK_R=128, BLOCK_L=64, BLOCK_K=64),
    _config(8, 3, BLOCK_R=128, BLOCK_L=128, BLOCK_K=64),
    _config(4, 4, BLOCK_R=64, BLOCK_L=128, BLOCK_K=64),
    _config(4, 4, BLOCK_R=64, BLOCK_L=64, BLOCK_K=64),
    _config(4, 5, BLOCK_R=32, BLOCK_L=128, BLOCK_K=64),
    _config(4, 5, BLOCK_R=128, BLOCK_L=64, BLOCK_K=32),
]
FP32_CONFIGS = [
    _config(4, 3, BLOCK_R=64, BLOCK_L=64, BLOCK_K=32),
    _config(4, 3, BLOCK_R=32, BLOCK_L=64, BLOCK_K=32),
]
_INTERPRETED = _config(4, 1, BLOCK_R=16, BLOCK_L=32, BLOCK_K=16)

# A split reduces at least this much of K: below it the partials' bytes outgrow the gradient's own.
MIN_SPLIT_K = 256


@functools.lru_cache(maxsize=None)
def _target_programs(device_index) -> int:
    """Two programs per multiprocessor: enough loads in flight to stream the gradient."""
    if device_index is None:
        return 2 * 132
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(rank, native):
    """The tile for a projector of rank `rank`: the whole rank in one tile up to 128 (the gradient read once);
    `native`: bf16/fp16 products on tensor cores, else float32 products."""
    if triton_interpreted():
        return _INTERPRETED
    if not native:
        return FP32_CONFIGS[0] if rank > 32 else FP32_CONFIGS[1]
    if rank <= 32:
        return CONFIGS[4]
    if rank <= 64:
        return CONFIGS[3]
    # Above 128 the rank spans several tiles; a shorter K step with a deeper pipeline measured fastest there
    # (H100, bench/time_projection.py --configs: 2048x5461 r=512 86 us against 119 for 128x64x64).
    return CONFIGS[0] if rank <= 128 else CONFIGS[5]


def _splits(tiles, K, block_k, device, splits=None):
    """(splits, K per split): enough programs for the GPU, each split at least MIN_SPLIT_K long (BLOCK_K
    under the interpreter, so that its small tests take the split path), none empty."""
    if splits is None:
        min_k = block_k if triton_interpreted() else MIN_SPLIT_K
        target = _target_programs(device.index if device.type == "cuda" else None)
        splits = max(1, min(triton.cdiv(target, tiles), K // min_k))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


def _matmul_into(out, a, b, projector_is_m, config=None, splits=None):
    """out (M, N), contiguous, = a (M, K) @ b (K, N) (any strides), float32 accumulation, one rounding to
    out's dtype. `projector_is_m`: M is the projector's rank (else N). `config`, `splits` force the tile and
    the number of splits (tests, benchmarks); by default both follow from the shape."""
    (M, K), N = a.shape, b.shape[1]
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    native = a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and not triton_interpreted()
    config = config or default_config(M if projector_is_m else N, native)
    meta = config.kwargs
    block_m, block_n = (meta["BLOCK_R"], meta["BLOCK_L"]) if projector_is_m else (meta["BLOCK_L"], meta["BLOCK_R"])
    n_load = N
    if projector_is_m and triton.cdiv(M, block_m) > 1 and b.dtype in (torch.bfloat16, torch.float16) and \
            needs_alignment(b):
        # A misaligned gradient read once per tile of the rank: each read is scalar loads without a pipeline,
        # so copying it padded first pays (H200, 2048 x 5461 bf16, r = 512: 79 -> 13 + 34 us; at r = 128, one
        # rank tile, the copy would cost more than it saves: 26 against 13 + 20).
        b = aligned_rows(b)
        n_load = b.stride(0)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits, k_per_split = _splits(tiles, K, meta["BLOCK_K"], out.device, splits)
    target = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=out.device)
    # Exact float32 products where the result is float32; the two-sided product's float32 intermediate times
    # the other (16-bit) projector takes 3xTF32, its error far below the final 16-bit rounding.
    precision = "ieee" if out.dtype == torch.float32 and a.dtype == b.dtype == torch.float32 else "tf32x3"
    _split_k_kernel[(tiles, splits)](
        a, b, target, M, N, n_load, K, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        M * N if splits > 1 else 0, N,
        M_FASTEST=projector_is_m, NATIVE_DOT=native, DOT_PRECISION=precision,
        BITWISE_BF16=splits == 1 and bitwise_bf16(out.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=meta["BLOCK_K"],
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](
            target, out, M * N, splits, BITWISE_BF16=bitwise_bf16(out.dtype), BLOCK=block, num_warps=4
        )
    return out


def project_grad(grad, left, right, config=None, splits=None):
    """Same contract as the reference op; float64 takes the reference path. Inputs of any strides are
    read in place (a transposed gradient too, at uncoalesced speed). The two-sided product forms P^T G
    (or G Q, whichever is smaller) in float32 and multiplies it by the other projector with the same kernel."""
    check_project_grad_args(grad, left, right)
    if grad.dtype == torch.float64:
        return project_grad_op.reference(grad, left, right)
    out = torch.empty(project_grad_shape(grad, left, right), dtype=grad.dtype, device=grad.device)
    if left is not None and right is not None:
        m, n = grad.shape
        if left.shape[1] * n <= m * right.shape[1]:
            inner = _matmul_into(torch.empty(left.shape[1], n, dtype=torch.float32, device=grad.device),
                                 left.T, grad, True, config, splits)
            return _matmul_into(out, inner, right, False, config, splits)
        inner = _matmul_into(torch.empty(m, right.shape[1], dtype=torch.float32, device=grad.device),
                             grad, right, False, config, splits)
        return _matmul_into(out, left.T, inner, True, config, splits)
    if left is not None:
        return _matmul_into(out, left.T, grad, True, config, splits)
    return _matmul_into(out, grad, right, False, config, splits)
