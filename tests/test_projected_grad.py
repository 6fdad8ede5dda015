"""projected_grad (P^T dV, dV Q, P^T dV Q) and grad_sketch (dV Omega) against the dense autograd dV."""

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

# (T, in, out, r)
SHAPES = [(1, 1, 1, 1), (5, 3, 17, 2), (33, 17, 3, 3), (1, 129, 17, 5), (5, 17, 129, 4), (33, 129, 129, 7)]
SIDES = ("left", "right", "both")


def make_case(T, inp, out, r, dtype, detach_norm):
    """Inputs of projected_grad and the float64 autograd dV of the full-mode layer they describe."""
    x = torch.randn(T, inp, device=DEVICE, dtype=torch.float64).to(dtype)
    direction = (torch.randn(out, inp, device=DEVICE, dtype=torch.float64) / inp**0.5).to(dtype)
    magnitude = (torch.rand(out, device=DEVICE, dtype=torch.float64) + 0.5).to(dtype)
    grad_out = torch.randn(T, out, device=DEVICE, dtype=torch.float64).to(dtype)
    bias = None
    params = {"direction": direction.to(torch.float64), "magnitude": magnitude.to(torch.float64)}

    def weight_fn(direction, magnitude):
        return dense_full_weight(direction, magnitude, detach_norm)

    _, norm, grads = autograd_dense(weight_fn, x.to(torch.float64), params, bias, grad_out.to(torch.float64))
    m64 = magnitude.to(torch.float64)
    row_scale = m64 / norm
    c2 = torch.zeros_like(m64) if detach_norm else m64 * grads["magnitude"] / norm**2
    # Projectors need not be orthonormal for the identity; random ones test it more generally.
    left = torch.randn(out, r, device=DEVICE, dtype=torch.float64)
    right = torch.randn(inp, r, device=DEVICE, dtype=torch.float64)
    coefficient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = {
        "grad_out": grad_out, "x": x, "direction": direction,
        "row_scale": row_scale.to(coefficient_dtype), "c2": c2.to(coefficient_dtype),
        "left": left.to(coefficient_dtype), "right": right.to(coefficient_dtype),
    }
    return inputs, grads["direction"], weight_fn, params


def project(dV, left, right, side):
    if side in ("left", "both"):
        dV = left.T @ dV
    if side in ("right", "both"):
        dV = dV @ right
    return dV


def call(backend, inputs, side):
    left = inputs["left"] if side in ("left", "both") else None
    right = inputs["right"] if side in ("right", "both") else None
    return run_op(
        ops.projected_grad, backend, inputs["grad_out"], inputs["x"], inputs["direction"], inputs["row_scale"],
        inputs["c2"], left, right,
    )


@pytest.mark.parametrize("backend", backend_params("projected_grad"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("T,inp,out,r", SHAPES)
def test_projected_grad_float64(backend, T, inp, out, r, side, detach_norm):
    inputs, dV, _, _ = make_case(T, inp, out, r, torch.float64, detach_norm)
    ours = call(backend, inputs, side)
    assert ours.dtype == torch.float64
    expected = project(dV, inputs["left"], inputs["right"], side)
    assert_close_scaled(ours, expected, 1e-10, f"projected ({side})", atol=1e-13)


@pytest.mark.parametrize("T,inp,out,k", [(1, 1, 1, 1), (5, 17, 3, 2), (33, 129, 17, 9)])
def test_grad_sketch_float64(T, inp, out, k):
    inputs, dV, _, _ = make_case(T, inp, out, k, torch.float64, False)
    omega = torch.randn(inp, k, dtype=torch.float64, device=DEVICE)
    sketch = ops.grad_sketch(
        inputs["grad_out"], inputs["x"], inputs["direction"], inputs["row_scale"], inputs["c2"], omega
    )
    assert sketch.shape == (out, k)
    assert_close_scaled(sketch, dV @ omega, 1e-10, "dV Omega", atol=1e-13)


@pytest.mark.parametrize("backend", backend_params("projected_grad"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T,inp,out,r", [(65, 129, 97, 8), pytest.param(2048, 2048, 4096, 128, marks=pytest.mark.gpu)])
def test_projected_grad_low_precision(backend, dtype, side, T, inp, out, r):
    inputs, dV, weight_fn, params = make_case(T, inp, out, r, dtype, False)
    ours = call(backend, inputs, side)
    assert ours.dtype == torch.float32
    # Baseline: autograd dV in the low dtype, projected in the low dtype.
    low_params = {k: v.to(dtype) for k, v in params.items()}
    _, _, low_grads = autograd_dense(weight_fn, inputs["x"], low_params, None, inputs["grad_out"])
    baseline = project(low_grads["direction"], inputs["left"].to(dtype), inputs["right"].to(dtype), side)
    truth = project(dV, inputs["left"].to(torch.float64), inputs["right"].to(torch.float64), side)
    assert_within_baseline(ours, baseline, truth, dtype, name=f"projected ({side})")


def test_projected_grad_needs_a_projector():
    inputs, _, _, _ = make_case(5, 17, 9, 2, torch.float32, False)
    with pytest.raises(ValueError, match="left.*right"):
        ops.projected_grad(
            inputs["grad_out"], inputs["x"], inputs["direction"], inputs["row_scale"], inputs["c2"], None, None
        )


@pytest.mark.parametrize("backend", other_backend_params("projected_grad"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_projected_grad_matches_reference(backend, dtype, side):
    inputs, _, _, _ = make_case(65, 129, 97, 8, dtype, False)
    left = inputs["left"] if side in ("left", "both") else None
    right = inputs["right"] if side in ("right", "both") else None
    args = [inputs[k] for k in ("grad_out", "x", "direction", "row_scale", "c2")] + [left, right]
    assert_matches_reference(ops.projected_grad, backend, args, rtol=1e-4)
