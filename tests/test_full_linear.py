"""full_forward / full_backward / norm_coefficients against autograd through W = diag(M / n) V (DESIGN.md 2)."""

import functools

import pytest
import torch
from conftest import (
    DEVICE,
    LOW_PRECISION,
    assert_close_scaled,
    assert_matches_reference,
    assert_within_baseline,
    autograd_dense,
    backend_params,
    dense_full_weight,
    other_backend_params,
    run_op,
)

from gradnormlorp_kernels import ops

# (T, in, out)
SHAPES = [(1, 1, 1), (5, 3, 17), (33, 17, 3), (1, 129, 17), (5, 17, 129), (33, 129, 129)]
# The last is a real layer (D = 4096), run on the GPU only.
LOW_SHAPES = [(33, 129, 65), (65, 65, 129), pytest.param(2048, 4096, 4096, marks=pytest.mark.gpu)]
GRAD_NAMES = ("x", "direction", "magnitude")


def make_case(T, inp, out, dtype, with_bias):
    case = {
        "x": torch.randn(T, inp, device=DEVICE),
        "direction": torch.randn(out, inp, device=DEVICE) / inp**0.5,
        "magnitude": (torch.rand(out, device=DEVICE) + 0.5) * torch.randn(out, device=DEVICE).sign(),
        "bias": 0.1 * torch.randn(out, device=DEVICE) if with_bias else None,
        "grad_out": torch.randn(T, out, device=DEVICE),
    }
    return {k: (v.to(dtype) if v is not None else None) for k, v in case.items()}


def truth(case, detach_norm, dtype=torch.float64):
    cast = {k: (v.to(dtype) if v is not None else None) for k, v in case.items()}
    weight_fn = functools.partial(dense_full_weight, detach_norm=detach_norm)
    params = {k: cast[k] for k in ("direction", "magnitude")}
    return autograd_dense(weight_fn, cast["x"], params, cast["bias"], cast["grad_out"])


def backward_args(case, out, norm, detach_norm, norm_dtype=None):
    x = case["x"]
    return [
        case["grad_out"], x, out.to(x.dtype), case["direction"], case["magnitude"],
        norm.to(norm_dtype or x.dtype), case["bias"], detach_norm,
    ]


@pytest.mark.parametrize("backend", backend_params("full_forward"))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,inp,out", SHAPES)
def test_full_forward_float64(backend, T, inp, out, with_bias):
    case = make_case(T, inp, out, torch.float64, with_bias)
    y, norm, _ = truth(case, detach_norm=False)
    ours = run_op(ops.full_forward, backend, case["x"], case["direction"], case["magnitude"] / norm, case["bias"])
    assert ours.dtype == torch.float64
    assert_close_scaled(ours, y, 1e-10, "y")


@pytest.mark.parametrize("backend", backend_params("full_backward"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,inp,out", SHAPES)
def test_full_backward_float64(backend, T, inp, out, with_bias, detach_norm):
    case = make_case(T, inp, out, torch.float64, with_bias)
    y, norm, grads = truth(case, detach_norm)
    ours = run_op(ops.full_backward, backend, *backward_args(case, y, norm, detach_norm))
    for name, value in zip(GRAD_NAMES, ours):
        assert value.dtype == torch.float64, name
        assert_close_scaled(value, grads[name], 1e-10, f"d{name}", atol=1e-13)


@pytest.mark.parametrize("backend", backend_params("norm_coefficients"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,inp,out", SHAPES)
def test_norm_coefficients_float64(backend, T, inp, out, with_bias, detach_norm):
    case = make_case(T, inp, out, torch.float64, with_bias)
    y, norm, grads = truth(case, detach_norm=False)
    magnitude = case["magnitude"]
    row_scale, c2, grad_magnitude = run_op(
        ops.norm_coefficients, backend, case["grad_out"], y, case["bias"], magnitude, norm, detach_norm
    )
    assert row_scale.dtype == c2.dtype == grad_magnitude.dtype == torch.float64
    assert_close_scaled(row_scale, magnitude / norm, 1e-12, "c1")
    assert_close_scaled(grad_magnitude, grads["magnitude"], 1e-10, "dM")
    if detach_norm:
        assert torch.equal(c2, torch.zeros_like(c2))
    else:
        # dV = diag(c1) G - diag(c2) V defines c2; check it through dV itself.
        gradient = case["grad_out"].T @ case["x"]
        dV = row_scale[:, None] * gradient - c2[:, None] * case["direction"]
        assert_close_scaled(dV, grads["direction"], 1e-10, "dV from c1, c2", atol=1e-13)
        assert_close_scaled(c2, magnitude * grads["magnitude"] / norm**2, 1e-10, "c2")


@pytest.mark.parametrize("backend", backend_params("full_forward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T,inp,out", LOW_SHAPES)
def test_full_forward_low_precision(backend, dtype, T, inp, out):
    case = make_case(T, inp, out, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    y_low, _, _ = truth(case, detach_norm=False, dtype=dtype)
    row_scale = (case["magnitude"].to(torch.float64) / norm).to(torch.float32)
    ours = run_op(ops.full_forward, backend, case["x"], case["direction"], row_scale, case["bias"])
    assert ours.dtype == dtype
    assert_within_baseline(ours, y_low, y, dtype, name="y")


@pytest.mark.parametrize("backend", backend_params("full_backward"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T,inp,out", LOW_SHAPES)
def test_full_backward_low_precision(backend, dtype, T, inp, out, detach_norm):
    case = make_case(T, inp, out, dtype, True)
    y, norm, grads = truth(case, detach_norm)
    _, _, baseline = truth(case, detach_norm, dtype=dtype)
    ours = run_op(ops.full_backward, backend, *backward_args(case, y, norm, detach_norm, torch.float32))
    for name, value in zip(GRAD_NAMES, ours):
        assert value.dtype == dtype, name
        assert_within_baseline(value, baseline[name], grads[name], dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", backend_params("norm_coefficients"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_norm_coefficients_low_precision(backend, dtype):
    case = make_case(65, 129, 33, dtype, True)
    y, norm, grads = truth(case, detach_norm=False)
    _, _, baseline = truth(case, detach_norm=False, dtype=dtype)
    row_scale, c2, grad_magnitude = run_op(
        ops.norm_coefficients, backend, case["grad_out"], y.to(dtype), case["bias"], case["magnitude"],
        norm.to(torch.float32), False,
    )
    assert row_scale.dtype == c2.dtype == grad_magnitude.dtype == torch.float32
    assert_within_baseline(grad_magnitude, baseline["magnitude"], grads["magnitude"], dtype, name="dM")
    magnitude = case["magnitude"].to(torch.float64)
    c2_truth = magnitude * grads["magnitude"] / norm**2
    c2_baseline = case["magnitude"] * baseline["magnitude"] / norm.to(dtype) ** 2
    assert_within_baseline(c2, c2_baseline, c2_truth, dtype, name="c2")


@pytest.mark.parametrize("backend", other_backend_params("full_forward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_full_forward_matches_reference(backend, dtype):
    case = make_case(33, 129, 65, dtype, True)
    row_scale = torch.rand(65, device=DEVICE) + 0.5
    args = [case["x"], case["direction"], row_scale, case["bias"]]
    assert_matches_reference(ops.full_forward, backend, args, rtol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", other_backend_params("full_backward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_full_backward_matches_reference(backend, dtype):
    case = make_case(33, 129, 65, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    args = backward_args(case, y, norm, False, torch.float32)
    assert_matches_reference(ops.full_backward, backend, args, rtol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", other_backend_params("norm_coefficients"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_norm_coefficients_matches_reference(backend, dtype):
    case = make_case(65, 129, 33, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    args = [case["grad_out"], y.to(dtype), case["bias"], case["magnitude"], norm.to(torch.float32), False]
    assert_matches_reference(ops.norm_coefficients, backend, args, rtol=1e-4)
