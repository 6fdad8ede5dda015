"""Row norms in one read of the weight: `||V||_row`, and `||W0 + s B A||_row` together with `W0 A^T`.

Both ops are bound by the one read of the weight. On a GPU `triton.autotune` picks the tile per
(rows, cols[, rank], dtypes) from a handful of configs; under TRITON_INTERPRET (no GPU to time
on, and slow) one small config runs instead.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted
from ..ops.row_norm import adapter_row_norm as adapter_row_norm_op, row_norm as row_norm_op
from ..ops._common import NORM_FLOOR
from .splits import TARGET_PROGRAMS, split_range

# The unit of adapter_row_norm's column ranges (a multiple of every BLOCK_K; see `_adapter_row_norm_into`).
_SPLIT_COLUMNS = tl.constexpr(256)


@triton.jit
def _row_norm_kernel(
    w_ptr, norm_ptr, rows, cols, stride_w, floor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    w_rows = w_ptr + row.to(tl.int64)[:, None] * stride_w
    squares = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Stages given explicitly: a loop without a dot is not software-pipelined otherwise, and the
    # asynchronous copies of the next tiles are what keeps enough bytes in flight.
    for start in tl.range(0, cols, BLOCK_N, num_stages=STAGES):
        col = start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (col < cols)[None, :]
        w = tl.load(w_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += w * w
    norm = tl.maximum(tl.sqrt(tl.sum(squares, axis=1)), floor)
    tl.store(norm_ptr + row, norm, mask=row_mask)


@triton.jit
def _adapter_row_norm_kernel(
    w_ptr, a_ptr, b_ptr, norm_ptr, base_a_ptr, gram_ptr, rows, cols, rank, cols_per_split, stride_w, stride_a,
    stride_b, scaling, floor, SPLIT: tl.constexpr, WITH_GRAM: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
):
    """One sweep over a block of W0's rows and a range of its columns: W0 A^T, and ||W0 + s B A||^2 summed tile
    by tile from the tile of W0 + s B A formed in registers (never stored). The A tile feeds both products, so
    no A A^T is formed beforehand (no launches before this one) and the sum of squares has no cancellation.
    SPLIT: the range's sums of squares and W0 A^T go to norm[split, row] and base_a[split, row, :], for
    `_adapter_row_norm_finish_kernel`; otherwise the range is the whole row and n and W0 A^T are stored.
    WITH_GRAM (with SPLIT): also the range's A A^T into gram[split], from the first row block (every block forms
    it, an eighth of the products at 64 rows, rather than a branch in the pipelined loop or another launch)."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_mask = row < rows
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + row.to(tl.int64)[:, None] * stride_w
    a_cols = a_ptr + r[None, :] * stride_a
    small_mask = row_mask[:, None] & r_mask[None, :]
    b = tl.load(b_ptr + row[:, None] * stride_b + r[None, :], mask=small_mask, other=0.0)
    if not NATIVE_DOT:
        b = b.to(tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    base_a = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    compensation = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    if SPLIT:
        # A multiple of _SPLIT_COLUMNS: without the hint the loads were not vectorised, and spilled on sm_90.
        first = tl.multiple_of(split * cols_per_split, _SPLIT_COLUMNS)
        end = tl.minimum(first + cols_per_split, cols)
    else:
        first = 0
        end = cols
    for offset in tl.range(0, end - first, BLOCK_K, num_stages=STAGES):
        col = first + offset + k
        col_mask = col < end
        w = tl.load(w_rows + col[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        a_t = tl.load(a_cols + col[:, None], mask=col_mask[:, None] & r_mask[None, :], other=0.0)  # A^T tile
        if NATIVE_DOT:  # bf16/fp16 products are exact in the float32 accumulator
            base_a = tl.dot(w, a_t, base_a)
            lora = tl.dot(b, tl.trans(a_t))
            if WITH_GRAM:
                gram = tl.dot(tl.trans(a_t), a_t, gram)
        else:
            a32 = a_t.to(tl.float32)
            # Each tile's products summed on their own, then added with compensation (Kahan): float32's
            # error then stays near cuBLAS's over long rows, where one running sum drifts several times further.
            tile = tl.dot(w.to(tl.float32), a32, input_precision="ieee") - compensation
            total = base_a + tile
            compensation = (total - base_a) - tile
            base_a = total
            lora = tl.dot(b, tl.trans(a32), input_precision="ieee")
            if WITH_GRAM:
                gram = tl.dot(tl.trans(a32), a32, gram, input_precision="ieee")
        merged = w.to(tl.float32) + scaling * lora
        squares += tl.sum(merged * merged, axis=1)
    if SPLIT:
        tl.store(norm_ptr + split * rows + row, squares, mask=row_mask)
        tl.store(base_a_ptr + (split * rows + row[:, None]) * rank + r[None, :], base_a, mask=small_mask)
        if WITH_GRAM:
            if tl.program_id(0) == 0:
                rr = tl.arange(0, BLOCK_R)
                tl.store(gram_ptr + (split * rank + rr[:, None]) * rank + r[None, :], gram,
                         mask=(rr < rank)[:, None] & r_mask[None, :])
    else:
        tl.store(norm_ptr + row, tl.maximum(tl.sqrt(squares), floor), mask=row_mask)
        tl.store(base_a_ptr + row[:, None] * rank + r[None, :], base_a, mask=small_mask)


@triton.jit
def _adapter_row_norm_finish_kernel(squares_ptr, partial_a_ptr, norm_ptr, base_a_ptr, rows, rank, splits, floor,
                                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """n and W0 A^T of a block of rows from the column ranges' partial sums, added in range order."""
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    row_mask = row < rows
    small_mask = row_mask[:, None] & (r < rank)[None, :]
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    base_a = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, splits):
        squares += tl.load(squares_ptr + split * rows + row, mask=row_mask, other=0.0)
        base_a += tl.load(partial_a_ptr + (split * rows + row[:, None]) * rank + r[None, :], mask=small_mask,
                          other=0.0)
    tl.store(norm_ptr + row, tl.maximum(tl.sqrt(squares), floor), mask=row_mask)
    tl.store(base_a_ptr + row[:, None] * rank + r[None, :], base_a, mask=small_mask)


def _config(num_warps, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=meta["STAGES"])


# Short-lived programs of a few rows, or fewer, longer ones with deeper pipelines: which fills the
# memory system best depends on the shape and the GPU, so autotune times them. The first, without
# pipelining, is the fixed tile this op used before.
ROW_NORM_CONFIGS = [
    _config(4, BLOCK_M=4, BLOCK_N=1024, STAGES=1),
    _config(4, BLOCK_M=4, BLOCK_N=1024, STAGES=3),
    _config(4, BLOCK_M=8, BLOCK_N=512, STAGES=4),
    _config(8, BLOCK_M=16, BLOCK_N=512, STAGES=3),
    _config(4, BLOCK_M=32, BLOCK_N=256, STAGES=4),
]
_ROW_NORM_INTERPRETED = _config(4, BLOCK_M=4, BLOCK_N=64, STAGES=1)

# Tall row blocks keep the re-reads of A (every program reads all of it, from L2) a fraction of W0's
# bytes and use Hopper's 64-row warpgroup MMA; 32-row blocks give twice the programs for weights with
# few rows. STAGES - 1 tiles of W0 and A are in flight per program.
ADAPTER_CONFIGS = [
    _config(4, BLOCK_M=64, BLOCK_K=128, STAGES=4),
    _config(4, BLOCK_M=64, BLOCK_K=64, STAGES=5),
    _config(8, BLOCK_M=64, BLOCK_K=256, STAGES=3),
    _config(8, BLOCK_M=128, BLOCK_K=64, STAGES=4),
    _config(8, BLOCK_M=128, BLOCK_K=128, STAGES=3),
    _config(4, BLOCK_M=32, BLOCK_K=128, STAGES=4),
]
_ADAPTER_INTERPRETED = _config(4, BLOCK_M=16, BLOCK_K=64, STAGES=1)
# Column splits of adapter_row_norm count row blocks of the tall tiles' height.
_TYPICAL_ROWS = 64
_GRAM_TARGET_PROGRAMS = 256


def _adapter_prune(configs, named_args, **kwargs):
    """The configs for this launch's kind of product. Above BLOCK_R 64, or with the A A^T accumulator, the
    registers left hold at most 32 elements of the W0 tile per thread, and with A A^T only 64-row blocks or
    taller (the tiles that stay spill-free on sm_90). Products on tensor cores only: float32 factors take the
    reference on a GPU (`products_on_fma_units`)."""
    block_r, gram = kwargs["BLOCK_R"], kwargs.get("WITH_GRAM", False)
    if block_r <= 64 and not gram:
        return ADAPTER_CONFIGS
    return [c for c in ADAPTER_CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps
            and (not gram or c.kwargs["BLOCK_M"] >= 64)]


# Timings cached on disk: later processes on this machine take the same tile without re-timing, so a
# run and its resumption sum in the same order.
_row_norm_tuned = triton.autotune(ROW_NORM_CONFIGS, key=["rows", "cols"], cache_results=True)(_row_norm_kernel)
_adapter_row_norm_tuned = triton.autotune(
    ADAPTER_CONFIGS, key=["rows", "cols", "rank", "cols_per_split", "WITH_GRAM"],
    prune_configs_by={"early_config_prune": _adapter_prune}, cache_results=True,
)(_adapter_row_norm_kernel)


# The tile autotune chose for each launch signature (a superset of its key): later launches go straight to
# the kernel, without the autotuner's per-call handling of every argument.
_CHOSEN: dict[tuple, triton.Config] = {}


def _launch(tuned, kernel, rows, interpreted_config, config, args, meta, splits=1):
    """`tuned` (autotune picks the tile) or, with a `config` given or under the interpreter, `kernel` with it,
    on a grid of (row blocks, `splits`)."""
    if config is None and not triton_interpreted():
        key = (kernel, splits, *meta.items(),
               *(a.dtype if isinstance(a, torch.Tensor) else a for a in args))
        config = _CHOSEN.get(key)
        if config is None:
            tuned[lambda m: (triton.cdiv(rows, m["BLOCK_M"]), splits)](*args, **meta)
            _CHOSEN[key] = tuned.best_config
            return
    config = config or interpreted_config
    kernel[(triton.cdiv(rows, config.kwargs["BLOCK_M"]), splits)](
        *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
    )


def _row_norm_into(norm, weight, config=None):
    """Row norms of `weight` (unit column stride) into the contiguous float32 `norm`; `config` forces a tile."""
    rows, cols = weight.shape
    if rows:
        args = (weight, norm, rows, cols, weight.stride(0), NORM_FLOOR)
        _launch(_row_norm_tuned, _row_norm_kernel, rows, _ROW_NORM_INTERPRETED, config, args, {})


def _column_ranges(rows, cols, with_gram=False):
    """(splits, columns per split) of adapter_row_norm's sweep. Weights with few row blocks (11008 rows are 172
    blocks of 64 for 132 multiprocessors) also split their columns, so that enough programs stream W0. With
    A A^T, half as many programs (H200, 4096 x 4096 r=64: 18.0 us against 20.7; r=16 and 11008 rows: even)."""
    return split_range(cols, _SPLIT_COLUMNS.value, triton.cdiv(rows, _TYPICAL_ROWS),
                       _GRAM_TARGET_PROGRAMS if with_gram else TARGET_PROGRAMS)


def _adapter_sweep(squares, partial_a, gram, base_weight, lora_A, lora_B, scaling, split, cols_per_split, config):
    """One launch of `_adapter_row_norm_kernel`: with `split`, per column range into `squares`, `partial_a` and
    (given) `gram`; otherwise n and W0 A^T of whole rows into the first two."""
    rows, cols = base_weight.shape
    rank = lora_A.shape[0]
    # The interpreter has no bf16 arithmetic: there the products run in float32 (same values).
    native = (base_weight.dtype == lora_A.dtype == lora_B.dtype and base_weight.dtype in (torch.bfloat16, torch.float16)
              and not triton_interpreted())
    args = (base_weight, lora_A, lora_B, squares, partial_a, squares if gram is None else gram, rows, cols, rank,
            cols_per_split, base_weight.stride(0), lora_A.stride(0), lora_B.stride(0), float(scaling), NORM_FLOOR)
    meta = {"SPLIT": split, "WITH_GRAM": gram is not None, "NATIVE_DOT": native,
            "BLOCK_R": max(16, triton.next_power_of_2(rank))}
    _launch(_adapter_row_norm_tuned, _adapter_row_norm_kernel, rows, _ADAPTER_INTERPRETED, config, args, meta,
            squares.shape[0] if split else 1)


def adapter_row_norm_partials(base_weight, lora_A, lora_B, scaling, with_gram, config=None):
    """Per column range, the sums of squares of the rows of W0 + s B A, W0 A^T and (`with_gram`, ranks up to 64)
    A A^T: float32 (splits, rows), (splits, rows, r) and (splits, r, r) or None, for a kernel that adds the
    ranges (inputs with unit column stride and rows)."""
    rows, cols = base_weight.shape
    rank = lora_A.shape[0]
    splits, cols_per_split = _column_ranges(rows, cols, with_gram)
    squares = torch.empty(splits, rows, dtype=torch.float32, device=base_weight.device)
    partial_a = torch.empty(splits, rows, rank, dtype=torch.float32, device=base_weight.device)
    gram = torch.empty(splits, rank, rank, dtype=torch.float32, device=base_weight.device) if with_gram else None
    _adapter_sweep(squares, partial_a, gram, base_weight, lora_A, lora_B, scaling, True, cols_per_split, config)
    return squares, partial_a, gram


def _adapter_row_norm_into(norm, base_A, base_weight, lora_A, lora_B, scaling, config=None):
    """`(n, W0 A^T)` into the contiguous float32 `norm` and `base_A` (inputs with unit column stride);
    `config` forces a tile."""
    rows, cols = base_weight.shape
    if not rows:
        return
    splits, cols_per_split = _column_ranges(rows, cols)
    if splits == 1:
        _adapter_sweep(norm, base_A, None, base_weight, lora_A, lora_B, scaling, False, cols_per_split, config)
        return
    squares, partial_a, _ = adapter_row_norm_partials(base_weight, lora_A, lora_B, scaling, False, config)
    finish_rows = 32
    _adapter_row_norm_finish_kernel[(triton.cdiv(rows, finish_rows),)](
        squares, partial_a, norm, base_A, rows, lora_A.shape[0], splits, NORM_FLOOR, BLOCK_M=finish_rows,
        BLOCK_R=max(16, triton.next_power_of_2(lora_A.shape[0])), num_warps=4,
    )


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """float32 row norms; float64 weights take the reference path (its exactness tests)."""
    if weight.dtype == torch.float64:
        return row_norm_op.reference(weight)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    norm = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    _row_norm_into(norm, weight)
    return norm


def products_on_fma_units(weight, lora_A, lora_B):
    """Whether the kernels would form products with the factors on the FMA units (float32 or mixed dtypes) on a
    GPU. There torch's dense path (cuBLAS) is the faster (H200: the adapter weight at 4096 x 4096 float32 237-531
    us against the kernel's 252-2362 at r = 16-256; adapter_row_norm of a bf16 11008 x 4096 with float32 factors,
    r=16, 448 against 536), so those calls take it. The interpreter keeps the kernels: it is how CI covers them."""
    narrow = (torch.bfloat16, torch.float16)
    return not triton_interpreted() and not (weight.dtype in narrow and lora_A.dtype == lora_B.dtype == weight.dtype)


def adapter_row_norm(base_weight, lora_A, lora_B, scaling):
    """`(n, W0 A^T)` as the reference, W0 read once; float64, and float32 products on a GPU
    (`products_on_fma_units`), take the reference path."""
    if torch.float64 in (base_weight.dtype, lora_A.dtype, lora_B.dtype) or \
            products_on_fma_units(base_weight, lora_A, lora_B):
        return adapter_row_norm_op.reference(base_weight, lora_A, lora_B, scaling)
    base_weight, lora_A, lora_B = (t if t.stride(1) == 1 else t.contiguous() for t in (base_weight, lora_A, lora_B))
    rows = base_weight.shape[0]
    norm = torch.empty(rows, dtype=torch.float32, device=base_weight.device)
    base_A = torch.empty(rows, lora_A.shape[0], dtype=torch.float32, device=base_weight.device)
    _adapter_row_norm_into(norm, base_A, base_weight, lora_A, lora_B, scaling)
    return norm, base_A
