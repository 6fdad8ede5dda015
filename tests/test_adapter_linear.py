"""adapter_weight / adapter_backward against autograd through the dense adapter formula (DESIGN.md 2)."""

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
    poisoned_empty,
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


def merged_A(case, dtype=torch.float64):
    """W' A^T with W' = W0 + s B A, in float64, cast to `dtype`."""
    wide = {k: case[k].to(torch.float64) for k in ("base_weight", "lora_A", "lora_B")}
    merged = wide["base_weight"] + case["scaling"] * (wide["lora_B"] @ wide["lora_A"])
    return (merged @ wide["lora_A"].T).to(dtype)


def backward_args(case, out, norm, detach_norm, saved_dtype=None):
    """Arguments of adapter_backward with the saved tensors of the forward (norm, W' A^T in `saved_dtype`)."""
    saved_dtype = saved_dtype or case["x"].dtype
    x, lora_A = case["x"], case["lora_A"]
    x_A = (x.to(torch.float64) @ lora_A.to(torch.float64).T).to(x.dtype)
    return [
        case["grad_out"], x, out.to(x.dtype), x_A, case["base_weight"], merged_A(case, saved_dtype), lora_A,
        case["lora_B"], case["magnitude"], norm.to(saved_dtype), case["bias"], case["scaling"], detach_norm,
    ]


def weight_args(case):
    return [case["base_weight"], case["lora_A"], case["lora_B"], case["magnitude"], case["scaling"]]


@pytest.mark.parametrize("backend", backend_params("adapter_weight"))
@pytest.mark.parametrize("inp,out,r", [(1, 1, 1), (3, 17, 2), (17, 3, 3), (129, 17, 5), (17, 129, 4),
                                       (129, 129, 7), (9, 70, 70), (0, 5, 2)])
def test_adapter_weight_float64(backend, inp, out, r):
    case = make_case(1, inp, out, r, torch.float64, False)
    weight, norm = dense_adapter_weight(*weight_args(case))
    with poisoned_empty():
        ours, ours_norm, weight_A = run_op(ops.adapter_weight, backend, *weight_args(case))
    assert ours.dtype == ours_norm.dtype == weight_A.dtype == torch.float64
    assert_close_scaled(ours, weight, 1e-12, "W")
    assert_close_scaled(ours_norm, norm.clamp_min(1e-12), 1e-12, "n")
    assert_close_scaled(weight_A, merged_A(case), 1e-12, "W' A^T")


@pytest.mark.parametrize("backend", backend_params("adapter_weight"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("inp,out,r", [(129, 65, 8), (65, 129, 3), (130, 33, 70), (257, 40, 16),
                                       pytest.param(4096, 4096, 16, marks=pytest.mark.gpu),
                                       pytest.param(2048, 5461, 64, marks=pytest.mark.gpu)])
def test_adapter_weight_low_precision(backend, dtype, inp, out, r):
    case = make_case(1, inp, out, r, dtype, False)
    wide = [a.to(torch.float64) if isinstance(a, torch.Tensor) else a for a in weight_args(case)]
    weight, norm = dense_adapter_weight(*wide)
    weight_low, norm_low = dense_adapter_weight(*weight_args(case))
    with poisoned_empty():
        ours, ours_norm, weight_A = run_op(ops.adapter_weight, backend, *weight_args(case))
    assert ours.dtype == dtype and ours_norm.dtype == weight_A.dtype == torch.float32
    assert_within_baseline(ours, weight_low, weight, dtype, name="W")
    assert_within_baseline(ours_norm, norm_low, norm, dtype, name="n")
    # The baseline for W' A^T: the same product formed in `dtype`.
    merged_low = case["base_weight"] + case["scaling"] * (case["lora_B"] @ case["lora_A"])
    assert_within_baseline(weight_A, merged_low @ case["lora_A"].T, merged_A(case), dtype, name="W' A^T")


@pytest.mark.parametrize("backend", backend_params("adapter_weight"))
def test_adapter_weight_at_init_is_the_base_weight(backend):
    # B = 0 and M = n (the layer's init): W == W0 bit for bit in float32.
    case = make_case(1, 65, 33, 4, torch.float32, False)
    case["lora_B"].zero_()
    _, norm, _ = run_op(ops.adapter_weight, backend, *weight_args(case))
    case["magnitude"] = norm
    weight, _, _ = run_op(ops.adapter_weight, backend, *weight_args(case))
    assert torch.equal(weight, case["base_weight"])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("inp,out,r", [(257, 40, 16), (130, 33, 70),
                                       pytest.param(4096, 4096, 16, marks=pytest.mark.gpu)])
def test_triton_backward_rebuilds_the_forward_weight_bit_for_bit(dtype, inp, out, r):
    # dx = g W uses a rebuilt W (from W0 and c1 = M / n, correctly rounded); it must be the forward's W.
    if "triton" not in [p.values[0] for p in backend_params("adapter_weight")]:
        pytest.skip("no triton backend here")
    from gradnormlorp_kernels.triton import linear

    case = make_case(1, inp, out, r, dtype, False)
    weight, norm, _ = run_op(ops.adapter_weight, "triton", *weight_args(case))
    row_scale = case["magnitude"].to(torch.float32) / norm
    rebuilt = linear.normalized_weight(case["base_weight"], case["lora_A"], case["lora_B"], row_scale,
                                       case["scaling"], dtype)
    assert torch.equal(rebuilt, weight)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-factors"])
def test_triton_float32_products_take_the_dense_path_with_the_forward_bits(monkeypatch, factor_dtype):
    # On a GPU, B A with float32 operands (float32 weights, or factors in another dtype than W0) is formed by
    # torch (faster there than the FMA-unit kernel); forward and rebuild must still agree bit for bit.
    if "triton" not in [p.values[0] for p in backend_params("adapter_weight")]:
        pytest.skip("no triton backend here")
    from gradnormlorp_kernels.triton import linear

    from gradnormlorp_kernels.triton import row_norm

    monkeypatch.setattr(row_norm, "triton_interpreted", lambda: False)  # decide as on a GPU; no kernel runs
    case = make_case(1, 70, 33, 5, torch.float32, False)
    case["lora_A"], case["lora_B"] = case["lora_A"].to(factor_dtype), case["lora_B"].to(factor_dtype)
    assert linear.products_on_fma_units(case["base_weight"], case["lora_A"], case["lora_B"])
    weight, norm, weight_A = linear.adapter_weight(*weight_args(case))
    for ours, theirs in zip((weight, norm, weight_A), ops.adapter_weight.reference(*weight_args(case))):
        assert torch.equal(ours, theirs)
    row_scale = case["magnitude"].to(torch.float32) / norm
    rebuilt = linear.normalized_weight(case["base_weight"], case["lora_A"], case["lora_B"], row_scale,
                                       case["scaling"], torch.float32)
    assert torch.equal(rebuilt, weight)


@pytest.mark.parametrize("backend", other_backend_params("adapter_weight"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adapter_weight_matches_reference(backend, dtype):
    case = make_case(1, 129, 65, 8, dtype, False)
    assert_matches_reference(ops.adapter_weight, backend, weight_args(case),
                             rtol=1e-5 if dtype == torch.float32 else 2e-2)


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


@pytest.mark.parametrize("backend", other_backend_params("adapter_backward"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_adapter_backward_matches_reference(backend, dtype):
    case = make_case(33, 129, 65, 8, dtype, True)
    y, norm, _ = truth(case, detach_norm=False)
    args = backward_args(case, y, norm, False, saved_dtype=torch.float32)
    assert_matches_reference(ops.adapter_backward, backend, args, rtol=1e-4 if dtype == torch.float32 else 2e-2)
