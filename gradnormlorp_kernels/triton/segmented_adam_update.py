"""`segmented_adam_update`: one finiteness check and one Adam update for every segment of flat buffers.

Each row of a program's tile is one quantisation block; a row finds its segment by a binary search over
the segment starts, so a tile may span segments and padding between them. The check marks a segment
non-finite with an atomic max and its last program advances every segment's `step`/`skipped`; the update
then reads its rows' flags and bias corrections. Per element the arithmetic is `adam_update`'s, so each
segment's states and direction are bit-identical to an `adam_update` of that segment alone.
"""

import torch
import triton
import triton.language as tl

from ..ops.quant8 import BLOCK_SIZE, num_blocks
from ..ops.segmented_adam_update import _check_args, check_segments
from ..ops.segmented_adam_update import segmented_adam_update as segmented_adam_update_op
from .adam_update import _adam_arithmetic, _load_moments
from .quant8 import CodeSearch, _quantize_block, code_search
from .rounding import _round_to, bitwise_bf16

_CHECK_ROWS = 32  # quantisation blocks per program of the check: 8192 elements
_SEGMENT_CHUNK = 128  # segments the check's last program advances at a time
# Quantisation blocks per program of the update and warps, 8-bit states, then float32: for 8-bit, one block on
# one warp a program was fastest at LLaMA-1B's projected moments (bench/time_segmented_adam.py --configs, H200:
# 130 us for 12.6M elements, 143 with two blocks on four warps, 226 with eight blocks): the kernel is bound by
# its table lookups, and small programs keep more of them in flight. The 8-bit update's registers are capped
# at 64, so that the 32 one-warp programs a multiprocessor holds are all resident: the two paths (with and
# without masks) take 80 otherwise. H200, rank 128 / 512: 123 / 438 us with masks everywhere, 109 / 383 with
# the mask-free path, 100 / 348 with it under the cap (no spills on sm_90; bench/NOTES.md).
_QUANTIZED_BLOCKS, _QUANTIZED_WARPS, _QUANTIZED_MAX_REGISTERS = 1, 1, 64
_PLAIN_BLOCKS, _PLAIN_WARPS = 2, 4


@triton.jit
def _segments_of(position, starts_ptr, numels_ptr, segments, SEARCH_STEPS: tl.constexpr):
    """For block starts `position`: the segment each lies in (the last start <= position) and its bounds."""
    segment = tl.zeros(position.shape, dtype=tl.int32)
    for level in tl.static_range(SEARCH_STEPS):
        probe = segment + (1 << (SEARCH_STEPS - 1 - level))
        inside = probe < segments
        start = tl.load(starts_ptr + probe, mask=inside, other=0).to(tl.int32)
        segment = tl.where(inside & (start <= position), probe, segment)
    start = tl.load(starts_ptr + segment).to(tl.int32)
    end = start + tl.load(numels_ptr + segment).to(tl.int32)
    return segment, start, end


@triton.jit
def _segment_check_kernel(grad_ptr, starts_ptr, numels_ptr, segments, flat_blocks, flags_ptr, step_ptr, skipped_ptr,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          SEGMENT_CHUNK: tl.constexpr):
    """flags[s] = 1 if segment s has a non-finite element; flags[segments] counts finished programs, and the
    last one (acquire-release atomics: it sees every flag) advances each segment's step or skipped."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    position = rows * BLOCK
    segment, start, end = _segments_of(position, starts_ptr, numels_ptr, segments, SEARCH_STEPS)
    row_valid = (rows < flat_blocks) & (position >= start) & (position < end)
    offsets = position[:, None] + tl.arange(0, BLOCK)[None, :]
    mask = row_valid[:, None] & (offsets < end[:, None])
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32), axis=1)
    # Only a non-finite row touches its flag: the common step costs one atomic a program.
    tl.atomic_max(flags_ptr + segment, bad, mask=row_valid & (bad > 0))
    finished = tl.atomic_add(flags_ptr + segments, 1)
    if finished == tl.num_programs(0) - 1:
        for first in range(0, segments, SEGMENT_CHUNK):
            index = first + tl.arange(0, SEGMENT_CHUNK)
            inside = index < segments
            nonfinite = tl.atomic_add(flags_ptr + index, tl.zeros_like(index), mask=inside).to(tl.float32)
            tl.store(step_ptr + index, tl.load(step_ptr + index, mask=inside, other=0.0) + (1.0 - nonfinite),
                     mask=inside)
            tl.store(skipped_ptr + index, tl.load(skipped_ptr + index, mask=inside, other=0.0) + nonfinite,
                     mask=inside)


@triton.jit
def _segmented_adam_kernel(
    grad_ptr, m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, table_m_ptr, table_v_ptr,
    midpoints_m_ptr, midpoints_v_ptr, out_ptr, scale_ptr, flags_ptr, power1_ptr, power2_ptr, starts_ptr, numels_ptr,
    segments, flat_blocks, beta1_weight, beta2, beta2_complement, eps, base_m, half_m, base_v, half_v,
    LERP_FROM_END: tl.constexpr, QUANTIZED: tl.constexpr, CANDIDATES_M: tl.constexpr, CANDIDATES_V: tl.constexpr,
    BITWISE_BF16: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr,
):
    """A [BLOCKS, BLOCK] tile per program, each row one quantisation block of whichever segment holds it;
    the arithmetic of `_adam_update_kernel` row by row. A tile of whole blocks of finite segments (nearly
    all of them) runs without masks: they were a tenth of the instructions of this instruction-bound kernel."""
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    position = blocks * BLOCK
    segment, start, end = _segments_of(position, starts_ptr, numels_ptr, segments, SEARCH_STEPS)
    block_mask = (blocks < flat_blocks) & (position >= start) & (position < end)
    finite_rows = tl.load(flags_ptr + segment) == 0
    whole = tl.min((block_mask & finite_rows & (position + BLOCK <= end)).to(tl.int32), axis=0)
    if whole != 0:
        _segmented_adam_tile(
            grad_ptr, m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, table_m_ptr, table_v_ptr,
            midpoints_m_ptr, midpoints_v_ptr, out_ptr, scale_ptr, power1_ptr, power2_ptr, blocks, segment, end,
            block_mask, finite_rows, beta1_weight, beta2, beta2_complement, eps, base_m, half_m, base_v, half_v,
            LERP_FROM_END, QUANTIZED, CANDIDATES_M, CANDIDATES_V, BITWISE_BF16, BLOCKS, BLOCK, MASKED=False,
        )
    else:
        _segmented_adam_tile(
            grad_ptr, m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, table_m_ptr, table_v_ptr,
            midpoints_m_ptr, midpoints_v_ptr, out_ptr, scale_ptr, power1_ptr, power2_ptr, blocks, segment, end,
            block_mask, finite_rows, beta1_weight, beta2, beta2_complement, eps, base_m, half_m, base_v, half_v,
            LERP_FROM_END, QUANTIZED, CANDIDATES_M, CANDIDATES_V, BITWISE_BF16, BLOCKS, BLOCK, MASKED=True,
        )


@triton.jit
def _segmented_adam_tile(
    grad_ptr, m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, table_m_ptr, table_v_ptr,
    midpoints_m_ptr, midpoints_v_ptr, out_ptr, scale_ptr, power1_ptr, power2_ptr, blocks, segment, end, block_mask,
    finite_rows, beta1_weight, beta2, beta2_complement, eps, base_m, half_m, base_v, half_v,
    LERP_FROM_END: tl.constexpr, QUANTIZED: tl.constexpr, CANDIDATES_M: tl.constexpr, CANDIDATES_V: tl.constexpr,
    BITWISE_BF16: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """The update of one tile; without MASKED every row is a whole block of a finite segment."""
    offsets = (blocks * BLOCK)[:, None] + tl.arange(0, BLOCK)[None, :]
    if MASKED:
        mask = block_mask[:, None] & (offsets < end[:, None])
        finite = finite_rows[:, None] & (tl.zeros([BLOCKS, BLOCK], dtype=tl.int32) == 0)
        write = mask & finite
        block_write = block_mask & finite_rows
        g = tl.where(finite, tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
    else:
        mask = None
        write = None
        block_write = None
        g = tl.load(grad_ptr + offsets).to(tl.float32)
    m, v = _load_moments(m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, offsets, blocks, mask,
                         block_mask, QUANTIZED, MASKED)
    m_new, v_new, direction = _adam_arithmetic(
        m, v, g, tl.load(power1_ptr + segment)[:, None], tl.load(power2_ptr + segment)[:, None], beta1_weight, beta2,
        beta2_complement, eps, LERP_FROM_END,
    )
    if MASKED:
        direction = tl.where(finite, direction, 0.0)
    tl.store(out_ptr + offsets, _round_to(direction * tl.load(scale_ptr), out_ptr.dtype.element_ty, BITWISE_BF16),
             mask=mask)
    if QUANTIZED:
        if MASKED:
            m_new = tl.where(mask, m_new, 0.0)
            v_new = tl.where(mask, v_new, 0.0)
        m_codes_new, m_absmax = _quantize_block(m_new, table_m_ptr, midpoints_m_ptr, base_m, half_m, CANDIDATES_M)
        v_codes_new, v_absmax = _quantize_block(v_new, table_v_ptr, midpoints_v_ptr, base_v, half_v, CANDIDATES_V)
        tl.store(m_ptr + offsets, m_codes_new.to(tl.uint8), mask=write)
        tl.store(v_ptr + offsets, v_codes_new.to(tl.uint8), mask=write)
        tl.store(absmax_m_ptr + blocks, m_absmax, mask=block_write)
        tl.store(absmax_v_ptr + blocks, v_absmax, mask=block_write)
    else:
        tl.store(m_ptr + offsets, m_new, mask=write)
        tl.store(v_ptr + offsets, v_new, mask=write)


def segmented_adam_update(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, starts,
                          numels, step, skipped, beta1, beta2, eps, scale, out_dtype):
    """Same contract as the reference op; float64 gradients or states take the reference path. The segments
    are checked on the host (a synchronisation) except inside a CUDA graph capture, where the caller vouches
    for them (`segment_layout`)."""
    if grad.dtype == torch.float64 or exp_avg.dtype == torch.float64:
        return segmented_adam_update_op.reference(
            grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, starts, numels, step,
            skipped, beta1, beta2, eps, scale, out_dtype,
        )
    _check_args(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, starts, numels, step, skipped, scale)
    if not (grad.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_segments(grad.numel(), starts, numels)
    out = torch.empty(grad.shape, dtype=out_dtype, device=grad.device)
    segments = starts.numel()
    flat_blocks = num_blocks(grad.numel())
    if flat_blocks == 0:
        step.add_(1.0)  # every segment is empty, so finite: a step, as adam_update counts one
        return out
    if grad.numel() >= 2**31:
        raise ValueError(f"grad must have fewer than 2**31 elements (int32 offsets), got {grad.numel()}")
    grad = grad.contiguous()
    search_steps = max(1, (segments - 1).bit_length())
    flags = torch.zeros(segments + 1, dtype=torch.int32, device=grad.device)
    _segment_check_kernel[(triton.cdiv(flat_blocks, _CHECK_ROWS),)](
        grad, starts, numels, segments, flat_blocks, flags, step, skipped,
        ROWS=_CHECK_ROWS, BLOCK=BLOCK_SIZE, SEARCH_STEPS=search_steps, SEGMENT_CHUNK=_SEGMENT_CHUNK, num_warps=8,
    )
    quantized = absmax_avg is not None
    if quantized:
        search_m, search_v = code_search(code_signed), code_search(code_unsigned)
        code_m = code_signed.to(torch.float32).contiguous()
        code_v = code_unsigned.to(torch.float32).contiguous()
        absmax_m, absmax_v = absmax_avg, absmax_avg_sq
        blocks, warps, registers = _QUANTIZED_BLOCKS, _QUANTIZED_WARPS, _QUANTIZED_MAX_REGISTERS
    else:
        code_m = code_v = absmax_m = absmax_v = flags
        search_m = search_v = CodeSearch(flags, flags, 0, 1, 0)
        blocks, warps, registers = _PLAIN_BLOCKS, _PLAIN_WARPS, None
    # beta ** step as adam_update computes it (torch's powf), for every segment in one launch.
    power1 = torch.pow(beta1, step)
    power2 = torch.pow(beta2, step)
    weight = 1.0 - beta1
    _segmented_adam_kernel[(triton.cdiv(flat_blocks, blocks),)](
        grad, exp_avg, exp_avg_sq, absmax_m, absmax_v, code_m, code_v, search_m.table, search_v.table,
        search_m.midpoints, search_v.midpoints, out, scale, flags, power1, power2, starts, numels,
        segments, flat_blocks, weight, beta2, 1.0 - beta2, eps, search_m.base, search_m.half, search_v.base,
        search_v.half, LERP_FROM_END=abs(weight) >= 0.5, QUANTIZED=quantized, CANDIDATES_M=search_m.candidates,
        CANDIDATES_V=search_v.candidates, BITWISE_BF16=bitwise_bf16(out_dtype),
        SEARCH_STEPS=search_steps, BLOCKS=blocks, BLOCK=BLOCK_SIZE, num_warps=warps, maxnreg=registers,
        enable_fp_fusion=False,  # torch rounds each product and sum of the update separately
    )
    return out
