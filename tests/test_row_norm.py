"""row_norm (full mode's ||V||_row) and adapter_row_norm (||W0 + s B A||_row and W0 A^T, without W')."""

import pytest
import torch
from conftest import (
    DEVICE,
    LOW_PRECISION,
    assert_close_scaled,
    assert_matches_reference,
    assert_within_baseline,
    backend_params,
    backends_for,
    dense_adapter_weight,
    other_backend_params,
    run_op,
)

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.ops._common import NORM_FLOOR

# (out, in, r): odd sizes, including a single row, a single column and rank 1.
SHAPES = [(1, 1, 1), (3, 17, 2), (17, 3, 3), (129, 17, 5), (17, 129, 1), (129, 129, 7)]


def adapter_inputs(out, inp, r, dtype):
    base = torch.randn(out, inp, dtype=dtype, device=DEVICE)
    lora_A = torch.randn(r, inp, dtype=dtype, device=DEVICE) / inp**0.5
    lora_B = torch.randn(out, r, dtype=dtype, device=DEVICE)
    scaling = float(torch.empty(()).uniform_(0.5, 2.0))
    return base, lora_A, lora_B, scaling


def upcast(*tensors):
    return [t.to(torch.float64) for t in tensors]


@pytest.mark.parametrize("backend", backend_params("row_norm"))
@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_row_norm_float64(backend, out, inp, r):
    weight = torch.randn(out, inp, dtype=torch.float64, device=DEVICE)
    norm = run_op(ops.row_norm, backend, weight)
    assert norm.dtype == torch.float64
    assert_close_scaled(norm, torch.linalg.vector_norm(weight, dim=1), 1e-12, "n")


@pytest.mark.parametrize("backend", backend_params("row_norm"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("out,inp", [(129, 257), pytest.param(4096, 4096, marks=pytest.mark.gpu)])
def test_row_norm_low_precision(backend, dtype, out, inp):
    # Magnitudes spread over rows so a per-row relative error would show.
    weight = (torch.randn(out, inp, device=DEVICE) * torch.logspace(-2, 2, out, device=DEVICE)[:, None]).to(dtype)
    norm = run_op(ops.row_norm, backend, weight)
    assert norm.dtype == torch.float32
    truth = torch.linalg.vector_norm(weight.to(torch.float64), dim=1)
    baseline = torch.linalg.vector_norm(weight, dim=1)
    # Per-row relative errors: every row's norm matters, small rows included.
    assert_within_baseline(norm / truth, baseline.to(torch.float64) / truth, torch.ones_like(truth), dtype, name="n")


@pytest.mark.parametrize("backend", backend_params("row_norm"))
def test_row_norm_zero_row_is_floored(backend):
    weight = torch.randn(5, 33, device=DEVICE)
    weight[2] = 0.0
    norm = run_op(ops.row_norm, backend, weight)
    assert norm[2].item() == pytest.approx(NORM_FLOOR)
    assert_close_scaled(norm[[0, 1, 3, 4]], torch.linalg.vector_norm(weight[[0, 1, 3, 4]], dim=1), 1e-6)


@pytest.mark.parametrize("backend", backend_params("adapter_row_norm"))
@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_adapter_row_norm_float64(backend, out, inp, r):
    base, lora_A, lora_B, scaling = adapter_inputs(out, inp, r, torch.float64)
    norm, base_A = run_op(ops.adapter_row_norm, backend, base, lora_A, lora_B, scaling)
    assert norm.dtype == base_A.dtype == torch.float64
    magnitude = torch.ones(out, dtype=torch.float64, device=DEVICE)
    _, truth = dense_adapter_weight(base, lora_A, lora_B, magnitude, scaling)
    # Per-row relative: the norm is built from a cancellation-prone sum of squares.
    assert_close_scaled(norm / truth, torch.ones_like(truth), 1e-10, "n")
    assert_close_scaled(base_A, base @ lora_A.T, 1e-12, "W0 A^T")


@pytest.mark.parametrize("backend", backend_params("adapter_row_norm"))
def test_adapter_row_norm_zero_B_is_base_norm(backend):
    # The initial state: B = 0 makes W' = W0, so M = ||W0||_row gives W == W0.
    base, lora_A, lora_B, scaling = adapter_inputs(17, 33, 4, torch.float64)
    norm, _ = run_op(ops.adapter_row_norm, backend, base, lora_A, torch.zeros_like(lora_B), scaling)
    assert_close_scaled(norm, torch.linalg.vector_norm(base, dim=1), 1e-12, "n")


@pytest.mark.parametrize("backend", backend_params("adapter_row_norm"))
def test_adapter_row_norm_cancelling_row(backend):
    # A row where s B A cancels W0 exactly: n is ~0 and must come back floored, finite, not NaN.
    base, lora_A, lora_B, scaling = adapter_inputs(5, 17, 3, torch.float64)
    lora_A = torch.linalg.qr(torch.randn(17, 3, dtype=torch.float64, device=DEVICE)).Q.T.contiguous()
    base[1] = -scaling * (lora_B[1] @ lora_A)
    norm, _ = run_op(ops.adapter_row_norm, backend, base, lora_A, lora_B, scaling)
    assert bool(torch.isfinite(norm).all())
    assert NORM_FLOOR <= norm[1].item() < 1e-6


@pytest.mark.parametrize("backend", backend_params("adapter_row_norm"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(
    "out,inp,r",
    [(129, 257, 8), (33, 129, 3)]
    + [pytest.param(*s, marks=pytest.mark.gpu) for s in [(4096, 4096, 16), (1037, 2113, 48), (4096, 4096, 128)]],
)
def test_adapter_row_norm_low_precision(backend, dtype, out, inp, r):
    base, lora_A, lora_B, scaling = adapter_inputs(out, inp, r, dtype)
    norm, base_A = run_op(ops.adapter_row_norm, backend, base, lora_A, lora_B, scaling)
    assert norm.dtype == base_A.dtype == torch.float32
    b64, a64, bb64 = upcast(base, lora_A, lora_B)
    ones = torch.ones(out, dtype=torch.float64, device=DEVICE)
    _, truth = dense_adapter_weight(b64, a64, bb64, ones, scaling)
    _, baseline = dense_adapter_weight(base, lora_A, lora_B, ones.to(dtype), scaling)
    assert_within_baseline(norm / truth, baseline.to(torch.float64) / truth, torch.ones_like(truth), dtype, name="n")
    assert_within_baseline(base_A, base @ lora_A.T, b64 @ a64.T, dtype, name="W0 A^T")


@pytest.mark.parametrize("backend", other_backend_params("row_norm"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_row_norm_matches_reference(backend, dtype):
    weight = torch.randn(65, 131, device=DEVICE).to(dtype)
    assert_matches_reference(ops.row_norm, backend, [weight], rtol=1e-5)


@pytest.mark.parametrize("backend", other_backend_params("adapter_row_norm"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adapter_row_norm_matches_reference(backend, dtype):
    args = adapter_inputs(65, 131, 5, dtype)
    assert_matches_reference(ops.adapter_row_norm, backend, list(args), rtol=1e-5)


# Every tile that autotune may pick on a GPU, forced one at a time (the interpreter runs them on a CPU), on
# shapes with a partial last row block and column tile, strided views as inputs, and outputs written into
# NaN-poisoned buffers whose guard rows after the end must stay untouched.
TRITON = "triton" in backends_for("adapter_row_norm")
if TRITON:
    from gradnormlorp_kernels.triton import row_norm as triton_row_norm


def triton_configs(pick):
    """`pytest.param`s of the configs `pick(module)` takes from the Triton module (a skip where it cannot load)."""
    if not TRITON:
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason="the Triton backend does not load here"))]
    configs = pick(triton_row_norm)
    return [pytest.param(c, id="-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}") for c in configs]


def poisoned(rows, *shape, guard=5):
    """(buffer, its first `rows` rows): the view is the output, the guard rows after it must stay NaN."""
    buffer = torch.full((rows + guard, *shape), float("nan"), device=DEVICE)
    return buffer, buffer[:rows]


def strided(rows, cols, dtype, scale=1.0):
    """A (rows, cols) view of a wider matrix: unit column stride, row stride cols + 3."""
    return (torch.randn(rows, cols + 3, device=DEVICE) * scale).to(dtype)[:, :cols]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("config", triton_configs(lambda m: m.ROW_NORM_CONFIGS + [m._ROW_NORM_INTERPRETED]))
def test_triton_row_norm_every_config(config, dtype):
    rows, cols = 2 * config.kwargs["BLOCK_M"] + 3, 2 * config.kwargs["BLOCK_N"] + 5
    weight = strided(rows, cols, dtype)
    buffer, norm = poisoned(rows)
    triton_row_norm._row_norm_into(norm, weight, config)
    assert bool(buffer[rows:].isnan().all()), "written past the last row"
    truth = torch.linalg.vector_norm(weight.to(torch.float64), dim=1)
    assert_close_scaled(norm / truth, torch.ones_like(truth), 1e-5, "n")


@pytest.mark.parametrize("r", [1, 48])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-W0-fp32-AB"])
@pytest.mark.parametrize(
    "config", triton_configs(lambda m: m.ADAPTER_CONFIGS + [m._ADAPTER_INTERPRETED])
)
def test_triton_adapter_row_norm_every_config(config, dtypes, r):
    if DEVICE == "cuda":
        if dtypes != (torch.bfloat16,) * 2:
            pytest.skip("float32 factors take the reference on a GPU (products_on_fma_units)")
        if all(config.kwargs != c.kwargs or config.num_warps != c.num_warps for c in triton_row_norm.ADAPTER_CONFIGS):
            pytest.skip("autotune never offers this tile (it may not fit the GPU's shared memory)")
    out, inp = 2 * config.kwargs["BLOCK_M"] + 3, 2 * config.kwargs["BLOCK_K"] + 5
    base = strided(out, inp, dtypes[0])
    lora_A = strided(r, inp, dtypes[1], inp**-0.5)
    lora_B = strided(out, r, dtypes[1])
    scaling = float(torch.empty(()).uniform_(0.5, 2.0))
    norm_buffer, norm = poisoned(out)
    base_A_buffer, base_A = poisoned(out, r)
    triton_row_norm._adapter_row_norm_into(norm, base_A, base, lora_A, lora_B, scaling, config)
    assert bool(norm_buffer[out:].isnan().all()) and bool(base_A_buffer[out:].isnan().all()), "written past the end"
    b64, a64, bb64 = upcast(base, lora_A, lora_B)
    _, truth = dense_adapter_weight(b64, a64, bb64, torch.ones(out, dtype=torch.float64, device=DEVICE), scaling)
    assert_close_scaled(norm / truth, torch.ones_like(truth), 1e-5, "n")
    assert_close_scaled(base_A, b64 @ a64.T, 1e-5, "W0 A^T")
