"""Adam's moments updated in place, 8-bit block-wise or float32, without a host synchronisation.

A first kernel decides whether the gradient is finite (a device flag) and advances `step`/`skipped`;
the update kernel reads that flag, so a non-finite gradient leaves every state untouched.
"""

import torch
import triton
import triton.language as tl

from ..ops.adam_update import adam_update as adam_update_op
from ..ops.quant8 import BLOCK_SIZE, num_blocks
from .quant8 import CodeSearch, _quantize_block, code_search

# Rows of BLOCK_SIZE elements per program of the update kernel and its warps: 8-bit states (one row per
# quantisation block, the absmax of a row reduced inside the program; one row on one warp, H200: 237 us at
# 4096 x 8192 against 294 with two rows on four warps, as in the segmented kernel, which shares this
# arithmetic), float32 states; elements per program of the finiteness check and its warps (each program ends
# on two atomics to one address: H200, 4096 x 8192 fp32, 42.8 us at 4096 on 8 warps, 35.3 at 16384 on 16 = 90%
# of the copy bandwidth; bench/time_finite_check.py).
_QUANTIZED_BLOCKS, _QUANTIZED_WARPS = 1, 1
_PLAIN_BLOCKS, _PLAIN_WARPS = 4, 4
_CHECK_BLOCK, _CHECK_WARPS = 16384, 16
# Programs the update aims for: a projected state (r x 2048, say) is a few hundred blocks, and 8 blocks a
# program would leave most of a GPU's multiprocessors idle, so small states take fewer blocks a program.
_TARGET_PROGRAMS = 512


@triton.jit
def _finite_check_kernel(grad_ptr, numel, flags_ptr, step_ptr, skipped_ptr, BLOCK: tl.constexpr):
    """flags[0] = 1 if any element is non-finite; the last program to finish advances step or skipped.

    flags[1] counts finished programs; the atomics are acquire-release, so the last one sees every flag.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32), axis=0)
    tl.atomic_max(flags_ptr, bad)
    finished = tl.atomic_add(flags_ptr + 1, 1)
    if finished == tl.num_programs(0) - 1:
        nonfinite = tl.atomic_add(flags_ptr, 0).to(tl.float32)
        tl.store(step_ptr, tl.load(step_ptr) + (1.0 - nonfinite))
        tl.store(skipped_ptr, tl.load(skipped_ptr) + nonfinite)


@triton.jit
def _adam_arithmetic(m, v, g, power1, power2, beta1_weight, beta2, beta2_complement, eps, LERP_FROM_END: tl.constexpr):
    """The reference's per-element Adam in float32: new moments and the direction, from beta ** step
    (`power1`, `power2`); shared with the segmented kernel, so both match the reference alike."""
    # torch.lerp's two formulas (it picks by |weight| < 0.5), fused as torch fuses them, so the moments
    # match the reference bit for bit.
    if LERP_FROM_END:
        m_new = tl.fma(m - g, 1.0 - beta1_weight, g)
    else:
        m_new = tl.fma(beta1_weight, g - m, m)
    v_new = v * beta2 + beta2_complement * g * g
    # Correctly rounded divisions and roots (Triton's defaults are approximate), as torch computes them;
    # the bias corrections as the reference's two scalar factors.
    inverse_bias1 = tl.div_rn(1.0, 1.0 - power1)
    inverse_root_bias2 = tl.div_rn(1.0, tl.sqrt_rn(1.0 - power2))
    direction = tl.div_rn(m_new * inverse_bias1, tl.sqrt_rn(v_new) * inverse_root_bias2 + eps)
    return m_new, v_new, direction


@triton.jit
def _load_moments(m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, offsets, blocks, mask, block_mask,
                  QUANTIZED: tl.constexpr, MASKED: tl.constexpr):
    """Both moments of a [blocks, 256] tile in float32: 8-bit codes dequantised by their maps and row absmax, or
    float32 states; bounds masks only with MASKED. Shared with the segmented kernel."""
    if QUANTIZED:
        if MASKED:
            m_codes = tl.load(m_ptr + offsets, mask=mask, other=0).to(tl.int32)
            v_codes = tl.load(v_ptr + offsets, mask=mask, other=0).to(tl.int32)
            absmax_m = tl.load(absmax_m_ptr + blocks, mask=block_mask, other=0.0)
            absmax_v = tl.load(absmax_v_ptr + blocks, mask=block_mask, other=0.0)
        else:
            m_codes = tl.load(m_ptr + offsets).to(tl.int32)
            v_codes = tl.load(v_ptr + offsets).to(tl.int32)
            absmax_m = tl.load(absmax_m_ptr + blocks)
            absmax_v = tl.load(absmax_v_ptr + blocks)
        m = tl.load(code_m_ptr + m_codes) * absmax_m[:, None]
        v = tl.load(code_v_ptr + v_codes) * absmax_v[:, None]
    else:
        if MASKED:
            m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
            v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
        else:
            m = tl.load(m_ptr + offsets)
            v = tl.load(v_ptr + offsets)
    return m, v


@triton.jit
def _adam_update_kernel(
    grad_ptr, m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, table_m_ptr, table_v_ptr,
    midpoints_m_ptr, midpoints_v_ptr, direction_ptr, flags_ptr, power1_ptr, power2_ptr, numel, first_program,
    beta1_weight, beta2, beta2_complement, eps, base_m, half_m, base_v, half_v,
    LERP_FROM_END: tl.constexpr, QUANTIZED: tl.constexpr, CANDIDATES_M: tl.constexpr, CANDIDATES_V: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """A [BLOCKS, BLOCK] tile per program, from tile `first_program` on; with 8-bit states each row is one
    quantisation block. Without MASKED every tile lies inside the tensor: no bounds masks."""
    blocks = (first_program + tl.program_id(0)) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    # Tile-shaped flags: the interpreter cannot broadcast a scalar mask.
    flag = tl.load(flags_ptr)
    finite = (tl.zeros([BLOCKS, BLOCK], dtype=tl.int32) + flag) == 0
    finite_rows = (tl.zeros([BLOCKS], dtype=tl.int32) + flag) == 0
    if MASKED:
        mask = offsets < numel
        block_mask = blocks * BLOCK < numel
        write = mask & finite
        block_write = block_mask & finite_rows
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = None
        block_mask = None
        write = finite
        block_write = finite_rows
        g = tl.load(grad_ptr + offsets).to(tl.float32)
    g = tl.where(finite, g, 0.0)
    m, v = _load_moments(m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, offsets, blocks, mask,
                         block_mask, QUANTIZED, MASKED)
    m_new, v_new, direction = _adam_arithmetic(m, v, g, tl.load(power1_ptr), tl.load(power2_ptr), beta1_weight,
                                               beta2, beta2_complement, eps, LERP_FROM_END)
    tl.store(direction_ptr + offsets, tl.where(finite, direction, 0.0), mask=mask)
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


def adam_update(grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, step, skipped,
                beta1, beta2, eps):
    """Same contract as the reference op; float64 gradients or states take the reference path."""
    if grad.dtype == torch.float64 or exp_avg.dtype == torch.float64 or step.dtype != torch.float32:
        return adam_update_op.reference(
            grad, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed, code_unsigned, step, skipped,
            beta1, beta2, eps,
        )
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not state.is_contiguous():
            raise ValueError(f"{name} must be contiguous to be updated in place")
    flat_grad = grad.reshape(-1).contiguous()
    numel = flat_grad.numel()
    direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    flags = torch.zeros(2, dtype=torch.int32, device=grad.device)
    _finite_check_kernel[(max(1, triton.cdiv(numel, _CHECK_BLOCK)),)](
        flat_grad, numel, flags, step, skipped, BLOCK=_CHECK_BLOCK, num_warps=_CHECK_WARPS
    )
    if numel == 0:
        return direction
    quantized = absmax_avg is not None
    if quantized:
        search_m, search_v = code_search(code_signed), code_search(code_unsigned)
        code_m = code_signed.to(torch.float32).contiguous()
        code_v = code_unsigned.to(torch.float32).contiguous()
        absmax_m, absmax_v = absmax_avg, absmax_avg_sq
        blocks, warps = _QUANTIZED_BLOCKS, _QUANTIZED_WARPS
    else:
        # Unused pointers and search in the float32 variant: any tensor on the device will do.
        code_m = code_v = absmax_m = absmax_v = flags
        search_m = search_v = CodeSearch(flags, flags, 0, 1, 0)
        blocks, warps = _PLAIN_BLOCKS, _PLAIN_WARPS
    # beta ** step exactly as the reference's powf (1 - beta2 ** step cancels, so an approximate power
    # would show), on the device from the step that the check kernel advanced: no host sync.
    power1 = torch.pow(beta1, step)
    power2 = torch.pow(beta2, step)
    weight = 1.0 - beta1
    while blocks > 1 and triton.cdiv(num_blocks(numel), blocks) < _TARGET_PROGRAMS:
        blocks //= 2
    # Whole tiles in one launch without bounds masks (a tenth of this instruction-bound kernel's instructions),
    # the partial last tile, if any, in a second: a kernel holding both paths took 80 registers, this one 64.
    tile = blocks * BLOCK_SIZE
    whole = numel // tile
    for first, programs, masked in ((0, whole, False), (whole, triton.cdiv(numel, tile) - whole, True)):
        if programs:
            _adam_update_kernel[(programs,)](
                flat_grad, exp_avg, exp_avg_sq, absmax_m, absmax_v, code_m, code_v, search_m.table, search_v.table,
                search_m.midpoints, search_v.midpoints, direction, flags, power1, power2, numel, first,
                weight, beta2, 1.0 - beta2, eps, search_m.base, search_m.half, search_v.base, search_v.half,
                LERP_FROM_END=abs(weight) >= 0.5, QUANTIZED=quantized, CANDIDATES_M=search_m.candidates,
                CANDIDATES_V=search_v.candidates, BLOCKS=blocks, BLOCK=BLOCK_SIZE, MASKED=masked, num_warps=warps,
                enable_fp_fusion=False,  # torch rounds each product and sum of the update separately
            )
    return direction
