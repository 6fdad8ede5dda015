"""8-bit block-wise (de)quantisation with a 256-entry dynamic map, several 256-element blocks per program.

The nearest code is torch.bucketize(scaled, midpoints) exactly, found by a table instead of a binary search:
a value's sign, exponent and top mantissa bits pick a bucket (2^-FRACTION_BITS of an octave wide), the table
holds how many midpoints lie below the bucket's smallest value, and a fixed number of comparisons with the
midpoints inside the bucket (one for bitsandbytes' maps) finishes. Two dependent loads per value, not eight.
"""

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops import quant8 as reference

CODE_SIZE = 256
# Buckets per octave: 2^7 keeps one midpoint per bucket for bitsandbytes' maps (the finest spacing is 0.7%
# of the value) with a table of under 6 KB; 2^6 would need two comparisons for the unsigned map.
_FRACTION_BITS = 7
_SHIFT = tl.constexpr(23 - _FRACTION_BITS)  # low float32 bits dropped: the rest name the bucket
_ONE_BITS = 0x3F800000  # float32 1.0: the top bucket holds it and everything larger
_INF_BITS = 0x7F800000
# Quantisation blocks per program and warps: 2048 values per program, 16 per thread, so each program has
# enough independent loads in flight and the per-block absmax is a reduction inside one warp's row.
_BLOCKS_PER_PROGRAM = 8
_NUM_WARPS = 4


class CodeSearch(NamedTuple):
    """What the kernels need to find a code in one map; see `code_search`."""

    midpoints: torch.Tensor  # float32: the 255 midpoints, then `candidates` +inf (no masks in the kernel)
    table: torch.Tensor  # uint8 (2 * half,): midpoints below each bucket's smallest value
    base: int  # (magnitude bits >> _SHIFT) - base is the bucket of a magnitude, clamped to [0, half - 1]
    half: int  # buckets per sign: negative values use table[half - 1 - bucket], others table[half + bucket]
    candidates: int  # the most midpoints inside one bucket: comparisons per value


# Per map tensor (by identity, checked through a weak reference; the version counter catches an in-place
# change), bounded: maps are few, and a stale entry only costs its recomputation.
_SEARCHES: dict[int, tuple[weakref.ref, int, CodeSearch]] = {}
_SEARCHES_KEPT = 64


@triton.jit
def _nearest_code(scaled, table_ptr, midpoints_ptr, base, half, CANDIDATES: tl.constexpr):
    """Index of the nearest map entry: how many of the sorted midpoints lie strictly below `scaled` (what
    torch.bucketize(scaled, midpoints) returns, for any float but NaN): a table load, then CANDIDATES
    independent midpoint loads."""
    bits = scaled.to(tl.int32, bitcast=True)
    bucket = tl.minimum(tl.maximum(((bits & 0x7FFFFFFF) >> _SHIFT) - base, 0), half - 1)
    # Negative values count down from the middle: half - 1 - bucket is half + ~bucket.
    first = tl.load(table_ptr + half + (bucket ^ (bits >> 31))).to(tl.int32)
    position = first
    for candidate in tl.static_range(CANDIDATES):
        position += (tl.load(midpoints_ptr + first + candidate) < scaled).to(tl.int32)
    return position


@triton.jit
def _quantize_block(values, table_ptr, midpoints_ptr, base, half, CANDIDATES: tl.constexpr):
    """Codes and absmax of a [blocks, 256] tile, exactly as the reference: scaled = clamp(x * (1 / absmax),
    -1, 1) with absmax per row. Elements past the end must hold 0 (they would count in the absmax)."""
    absmax = tl.max(tl.abs(values), axis=1)
    inverse = tl.where(absmax > 0, tl.div_rn(1.0, absmax), 0.0)  # correctly rounded, as torch's
    scaled = tl.minimum(tl.maximum(values * inverse[:, None], -1.0), 1.0)
    return _nearest_code(scaled, table_ptr, midpoints_ptr, base, half, CANDIDATES), absmax


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr, codes_ptr, absmax_ptr, table_ptr, midpoints_ptr, numel, base, half,
    CANDIDATES: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Bounds masks only on the last, partial tile: this kernel is bound by its instructions (H200, 4096 x 8192:
    # 67.7 -> 65.5 us).
    if (tl.program_id(0) + 1) * (BLOCKS * BLOCK) <= numel:
        _quantize_tile(x_ptr, codes_ptr, absmax_ptr, table_ptr, midpoints_ptr, numel, base, half, CANDIDATES,
                       BLOCKS, BLOCK, MASKED=False)
    else:
        _quantize_tile(x_ptr, codes_ptr, absmax_ptr, table_ptr, midpoints_ptr, numel, base, half, CANDIDATES,
                       BLOCKS, BLOCK, MASKED=True)


@triton.jit
def _quantize_tile(
    x_ptr, codes_ptr, absmax_ptr, table_ptr, midpoints_ptr, numel, base, half,
    CANDIDATES: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if MASKED:
        mask = offsets < numel
        block_mask = blocks * BLOCK < numel
        values = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = None
        block_mask = None
        values = tl.load(x_ptr + offsets).to(tl.float32)
    codes, absmax = _quantize_block(values, table_ptr, midpoints_ptr, base, half, CANDIDATES)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blocks, absmax, mask=block_mask)


@triton.jit
def _dequantize_blockwise_kernel(
    codes_ptr, absmax_ptr, code_ptr, out_ptr, numel, BLOCKS: tl.constexpr, BLOCK: tl.constexpr
):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offsets < numel
    codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks * BLOCK < numel, other=0.0)
    values = tl.load(code_ptr + codes) * absmax[:, None]
    tl.store(out_ptr + offsets, values, mask=mask)


def _build_search(code: torch.Tensor) -> CodeSearch:
    midpoints = ((code[1:] + code[:-1]) * 0.5).to(torch.float32)  # exactly as the reference computes them
    host = midpoints.cpu()
    magnitudes = host.abs().view(torch.int32)
    nonzero = magnitudes[magnitudes != 0]
    # The lowest octave that holds a nonzero midpoint (kept normal and at most 1.0's); bucket 0 gathers
    # every smaller magnitude.
    lowest_exponent = min(max(int(nonzero.min()) >> 23 if nonzero.numel() else 1, 1), 127)
    base = (lowest_exponent << _FRACTION_BITS) - 1
    half = (_ONE_BITS >> _SHIFT.value) - base + 1
    bucket = torch.arange(half, dtype=torch.int64)
    smallest = torch.where(bucket == 0, 0, (bucket + base) << _SHIFT.value)
    largest = torch.where(bucket == half - 1, _INF_BITS, ((bucket + base + 1) << _SHIFT.value) - 1)
    smallest, largest = (b.to(torch.int32).view(torch.float32) for b in (smallest, largest))
    # Each bucket's value range, negative buckets mirrored below the positive ones; bucketize is monotone,
    # so its values at a bucket's two ends bound every value inside.
    lowest = torch.cat([-largest.flip(0), smallest])
    highest = torch.cat([-smallest.flip(0), largest])
    first = torch.bucketize(lowest, host)
    candidates = int((torch.bucketize(highest, host) - first).max())
    padded = torch.cat([midpoints, midpoints.new_full((candidates,), float("inf"))]).contiguous()
    return CodeSearch(padded, first.to(torch.uint8).to(code.device), base, half, candidates)


def code_search(code: torch.Tensor) -> CodeSearch:
    """The search table of a map, built once per map tensor (reading its midpoints on the host) and kept
    (the optimizer passes the same cached map every step), so a step launches and synchronises nothing for it."""
    if code.numel() != CODE_SIZE:
        raise ValueError(f"code must hold {CODE_SIZE} entries, got {code.numel()}")
    cached = _SEARCHES.get(id(code))
    if cached is None or cached[0]() is not code or cached[1] != code._version:
        if len(_SEARCHES) >= _SEARCHES_KEPT:
            _SEARCHES.clear()
        cached = (weakref.ref(code), code._version, _build_search(code))
        _SEARCHES[id(code)] = cached
    return cached[2]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).contiguous()
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(reference.num_blocks(numel), dtype=torch.float32, device=x.device)
    if numel:
        search = code_search(code)
        _quantize_blockwise_kernel[(triton.cdiv(absmax.numel(), _BLOCKS_PER_PROGRAM),)](
            flat, codes, absmax, search.table, search.midpoints, numel, search.base, search.half,
            CANDIDATES=search.candidates, BLOCKS=_BLOCKS_PER_PROGRAM, BLOCK=reference.BLOCK_SIZE,
            num_warps=_NUM_WARPS,
        )
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).contiguous()
    numel = flat.numel()
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    if numel:
        _dequantize_blockwise_kernel[(triton.cdiv(reference.num_blocks(numel), _BLOCKS_PER_PROGRAM),)](
            flat, absmax.contiguous(), code.to(torch.float32).contiguous(), out, numel,
            BLOCKS=_BLOCKS_PER_PROGRAM, BLOCK=reference.BLOCK_SIZE, num_warps=_NUM_WARPS,
        )
    return out.view(codes.shape)
