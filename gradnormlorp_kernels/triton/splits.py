"""How a launcher cuts one dimension of its work into ranges, so that enough programs run at once."""

import triton

# Programs aimed for: a few per multiprocessor (132 on an H100 or H200), enough to keep loads in flight.
TARGET_PROGRAMS = 512


def split_range(length: int, unit: int, other_blocks: int, target: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(splits, per_split): `length` cut into about `target / other_blocks` ranges (at least one, and no more
    than one per `unit`), each a multiple of `unit` long but the last, which may be shorter."""
    splits = max(1, min(triton.cdiv(length, unit), triton.cdiv(target, max(1, other_blocks))))
    per_split = max(1, triton.cdiv(triton.cdiv(length, splits), unit)) * unit
    return max(1, triton.cdiv(length, per_split)), per_split
