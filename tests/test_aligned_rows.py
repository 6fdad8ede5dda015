"""aligned_rows: a copy of a matrix whose row stride is a multiple of 16 elements, the padding zeroed."""

import pytest
import torch
from conftest import DEVICE, backend_params, poisoned_empty, run_op

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.ops.aligned_rows import ALIGN_ELEMENTS, needs_alignment

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (rows, cols): odd widths, widths already aligned, single rows and columns, empty, and more than one program's
# tile of the Triton kernel in both dimensions (32 x 256).
SHAPES = [(37, 53), (1, 1), (1, 300), (70, 1), (33, 16), (3, 48), (65, 517), (0, 7), (5, 0)]


def call(backend, x):
    return run_op(ops.aligned_rows, backend, x)


def check(result, x):
    rows, cols = x.shape
    assert result.shape == x.shape and result.dtype == x.dtype and result.device == x.device
    assert result.stride(1) == 1 and result.stride(0) % ALIGN_ELEMENTS == 0 and result.stride(0) >= cols
    assert torch.equal(result, x)
    if rows:
        buffer = torch.as_strided(result, (rows, result.stride(0)), result.stride())
        assert not bool(buffer[:, cols:].ne(0).any()), "the padding must be zero"


@pytest.mark.parametrize("backend", backend_params("aligned_rows"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_copies_into_aligned_rows(backend, dtype, rows, cols):
    x = torch.randn(rows, cols, device=DEVICE).to(dtype)
    with poisoned_empty():  # an element of the buffer (padding included) left unwritten shows as NaN
        result = call(backend, x)
    check(result, x)
    assert rows * cols == 0 or result.data_ptr() != x.data_ptr(), "a copy, not the input"


@pytest.mark.parametrize("backend", backend_params("aligned_rows"))
def test_strided_sources(backend):
    # Rows of a wider buffer, a transpose (no unit column stride): the same values, aligned rows.
    wide = torch.randn(29, 80, device=DEVICE).to(torch.bfloat16)
    for x in (wide[:, 3:44], wide[:, :41].T, wide[::2, 5:70]):
        result = call(backend, x)
        check(result, x)
        assert not needs_alignment(result)


@pytest.mark.parametrize("backend", backend_params("aligned_rows"))
def test_rejects_other_ranks(backend):
    for bad in (torch.randn(7, device=DEVICE), torch.randn(2, 3, 4, device=DEVICE)):
        with pytest.raises(ValueError, match=r"aligned_rows: x must be a 2-D \(rows, cols\) tensor, got shape"):
            call(backend, bad)


def test_needs_alignment():
    assert needs_alignment(torch.empty(4, 5461))
    assert not needs_alignment(torch.empty(4, 5472))
    assert not needs_alignment(torch.empty(5461, 4).T)  # no unit column stride: not row-major
    assert not needs_alignment(torch.empty(1, 5461))  # a single row starts where its tensor starts
