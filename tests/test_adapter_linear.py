"""adapter_forward / adapter_backward against autograd through the dense adapter formula (DESIGN.md 2)."""

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
    dense_adapter_weight,
    other_backend_params,
    run_op,
)

from gradnormlorp_kernels import ops

# (T, in, out, r)
SHAPES = [(1, 1, 1, 1), (5, 3, 17, 2), (33, 17, 3, 3), (1, 129, 17, 5), (5, 17, 129, 4), (33, 129, 129, 7)]
# bf16/fp32 shapes; the last is a real layer (D = 4096, r = 16), run on the GPU only.
LOW_SHAPES = [(33, 129, 65, 8), (65, 65, 129, 3), pytest.param(2048, 4096, 4096, 16, marks=pytest.mark.gpu)]
GRAD_NAMES = ("x", "lora_A", "lora_B", "magnitude")


def make_case(T, inp, out, r, dtype, with_bias):
    """Random layer state with B != 0 (trained), magnitudes of both signs away from zero."""
    case = {
        "x": torch.randn(T, inp, dtype=dtype, device=DEVICE),
        "base_weight": torch.randn(out, inp, dtype=dtype, device=DEVICE) / inp**0.5,
        "lora_A": torch.randn(r, inp, dtype=dtype, device=DEVICE) / inp**0.5,
        "lora_B": torch.randn(out, r, dtype=dtype, device=DEVICE) * 0.5,
        "magnitude": (torch.rand(out, device=DEVICE) + 0.5) * torch.randn(out, device=DEVICE).sign(),
        "bias": 0.1 * torch.randn(out, device=DEVICE) if with_bias else None,
        "grad_out": torch.randn(T, out, device=DEVICE),
        "scaling": float(torch.empty(()).uniform_(0.5, 2.0)),
    }
    for key in ("magnitude", "bias", "grad_out"):
        if case[key] is not None:
            case[key] = case[key].to(dtype)
    return case


def truth(case, detach_norm, dtype=torch.float64):
    """Output, norm and gradients by autograd through the dense formula, computed in `dtype`."""
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    weight_fn = functools.partial(
        dense_adapter_weight, cast["base_weight"], scaling=cast["scaling"], detach_norm=detach_norm
    )
    params = {k: cast[k] for k in ("lora_A", "lora_B", "magnitude")}
    return autograd_dense(weight_fn, cast["x"], params, cast["bias"], cast["grad_out"])


def backward_args(case, out, norm, detach_norm, saved_dtype=None):
    """Arguments of adapter_backward with the saved tensors of the forward (norm, W0 A^T in `saved_dtype`)."""
    saved_dtype = saved_dtype or case["x"].dtype
    x, base, lora_A = case["x"], case["base_weight"], case["lora_A"]
    x_A = (x.to(torch.float64) @ lora_A.to(torch.float64).T).to(x.dtype)
    base_A = (base.to(torch.float64) @ lora_A.to(torch.float64).T).to(saved_dtype)
    return [
        case["grad_out"], x, out.to(x.dtype), x_A, base, base_A, lora_A, case["lora_B"], case["magnitude"],
        norm.to(saved_dtype), case["bias"], case["scaling"], detach_norm,
    ]


@pytest.mark.parametrize("backend", backend_params("adapter_forward"))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,inp,out,r", SHAPES)
def test_adapter_forward_float64(backend, T, inp, out, r, with_bias):
    case = make_case(T, inp, out, r, torch.float64, with_bias)
    y, norm, _ = truth(case, detach_norm=False)
    row_scale = case["magnitude"] / norm
    ours, x_A = run_op(
        ops.adapter_forward, backend, case["x"], case["base_weight"], case["lora_A"], case["lora_B"], row_scale,
        case["scaling"], case["bias"],
    )
    assert ours.dtype == x_A.dtype == torch.float64
    assert_close_scaled(ours, y, 1e-10, "y")
    assert_close_scaled(x_A, case["x"] @ case["lora_A"].T, 1e-12, "x A^T")


@pytest.mark.parametrize("backend", backend_params("adapter_backward"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,inp,out,r", SHAPES)
def test_adapter_backward_float64(backend, T, inp, out, r, with_bias, detach_norm):
    case = make_case(T, inp, out, r, torch.float64, with_bias)
    y, norm, grads = truth(case, detach_norm)
    ours = run_op(ops.adapter_backward, backend, *backward_args(case, y, norm, detach_norm))
    for name, value in zip(GRAD_NAMES, ours):
        assert value.dtype == torch.float64, name
        assert_close_scaled(value, grads[name], 1e-10, f"d{name}", atol=1e-13)


def test_detach_norm_changes_the_gradient():
    # Guards the detach test above against a no-op: the two gradients must differ.
    case = make_case(5, 17, 9, 3, torch.float64, True)
    _, _, exact = truth(case, detach_norm=False)
    _, _, detached = truth(case, detach_norm=True)
    assert not torch.allclose(exact["lora_A"], detached["lora_A"])
    assert torch.allclose(exact["magnitude"], detached["magnitude"])


@pytest.mark.parametrize("backend", backend_params("adapter_forward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T,inp,out,r", LOW_SHAPES)
def test_adapter_forward_low_precision(backend, dtype, T, inp, out, r):
    case = make_case(T, inp, out, r, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    y_low, norm_low, _ = truth(case, detach_norm=False, dtype=dtype)
    # The layer hands the forward M / n in float32 (from the row-norm op).
    row_scale = (case["magnitude"].to(torch.float64) / norm).to(torch.float32)
    ours, x_A = run_op(
        ops.adapter_forward, backend, case["x"], case["base_weight"], case["lora_A"], case["lora_B"], row_scale,
        case["scaling"], case["bias"],
    )
    assert ours.dtype == x_A.dtype == dtype
    assert_within_baseline(ours, y_low, y, dtype, name="y")
    x_A_truth = case["x"].to(torch.float64) @ case["lora_A"].to(torch.float64).T
    assert_within_baseline(x_A, case["x"] @ case["lora_A"].T, x_A_truth, dtype, name="x A^T")


@pytest.mark.parametrize("backend", backend_params("adapter_backward"))
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("T,inp,out,r", LOW_SHAPES)
def test_adapter_backward_low_precision(backend, dtype, T, inp, out, r, detach_norm):
    case = make_case(T, inp, out, r, dtype, True)
    y, norm, grads = truth(case, detach_norm)
    _, _, baseline = truth(case, detach_norm, dtype=dtype)
    # Saved tensors as the forward leaves them: y in the input dtype, n and W0 A^T in float32.
    args = backward_args(case, y, norm, detach_norm, saved_dtype=torch.float32)
    ours = run_op(ops.adapter_backward, backend, *args)
    for name, value in zip(GRAD_NAMES, ours):
        assert value.dtype == dtype, name
        assert_within_baseline(value, baseline[name], grads[name], dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", other_backend_params("adapter_forward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adapter_forward_matches_reference(backend, dtype):
    case = make_case(33, 129, 65, 8, dtype, True)
    row_scale = torch.rand(65, device=DEVICE) + 0.5
    args = [case["x"], case["base_weight"], case["lora_A"], case["lora_B"], row_scale, case["scaling"], case["bias"]]
    assert_matches_reference(ops.adapter_forward, backend, args, rtol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", other_backend_params("adapter_backward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adapter_backward_matches_reference(backend, dtype):
    case = make_case(33, 129, 65, 8, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    args = backward_args(case, y, norm, False, saved_dtype=torch.float32)
    assert_matches_reference(ops.adapter_backward, backend, args, rtol=1e-4 if dtype == torch.float32 else 2e-2)
