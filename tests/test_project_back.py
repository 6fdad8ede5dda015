"""project_back_update: W <- W (1 - gate decay) - gate step (P N Q^T) in place, returning the new row norms."""

import pytest
import torch
from conftest import DEVICE, assert_close_scaled, backend_params, run_op

from gradnormlorp_kernels import ops

SIDES = ("left", "right", "both", "none")
# (out, in, r)
SHAPES = [(1, 1, 1), (17, 3, 2), (33, 129, 5)]


def make_case(out, inp, r, side, weight_dtype, projector_dtype):
    left = torch.randn(out, r, device=DEVICE, dtype=projector_dtype) if side in ("left", "both") else None
    right = torch.randn(inp, r, device=DEVICE, dtype=projector_dtype) if side in ("right", "both") else None
    rows = r if left is not None else out
    cols = r if right is not None else inp
    direction = torch.randn(rows, cols, device=DEVICE, dtype=projector_dtype)
    weight = torch.randn(out, inp, device=DEVICE).to(weight_dtype)
    return weight, direction, left, right


def expected_weight(weight, direction, left, right, step_size, decay, gate):
    update = direction.to(torch.float64)
    if left is not None:
        update = left.to(torch.float64) @ update
    if right is not None:
        update = update @ right.to(torch.float64).T
    return weight.to(torch.float64) * (1.0 - gate * decay) - gate * step_size * update


def abs_or_none(tensor):
    return None if tensor is None else tensor.abs()


def call(backend, weight, direction, left, right, step_size, decay, gate):
    gate_tensor = torch.tensor(gate, dtype=torch.float32, device=DEVICE)
    return run_op(ops.project_back_update, backend, weight, direction, left, right, step_size, decay, gate_tensor)


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_float64(backend, out, inp, r, side):
    weight, direction, left, right = make_case(out, inp, r, side, torch.float64, torch.float64)
    step_size, decay = 0.05, 0.1
    expected = expected_weight(weight, direction, left, right, step_size, decay, 1.0)
    address = weight.data_ptr()
    norms = call(backend, weight, direction, left, right, step_size, decay, 1.0)
    assert weight.data_ptr() == address, "the weight must be updated in place"
    assert_close_scaled(weight, expected, 1e-12, "weight")
    assert norms.dtype == torch.float64
    assert_close_scaled(norms, torch.linalg.vector_norm(expected, dim=1), 1e-12, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("out,inp,r", [(65, 129, 8), pytest.param(4096, 4096, 128, marks=pytest.mark.gpu)])
def test_float32_weight(backend, side, out, inp, r):
    weight, direction, left, right = make_case(out, inp, r, side, torch.float32, torch.float32)
    original = weight.clone()
    norms = call(backend, weight, direction, left, right, 1e-2, 1e-3, 1.0)
    expected = expected_weight(original, direction, left, right, 1e-2, 1e-3, 1.0)
    assert_close_scaled(weight, expected, 1e-6, "weight")
    assert norms.dtype == torch.float32
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("out,inp,r", [(65, 129, 8), pytest.param(4096, 4096, 128, marks=pytest.mark.gpu)])
def test_bfloat16_weight(backend, side, out, inp, r):
    weight, direction, left, right = make_case(out, inp, r, side, torch.bfloat16, torch.float32)
    original = weight.clone()
    norms = call(backend, weight, direction, left, right, 1e-2, 1e-3, 1.0)
    assert weight.dtype == torch.bfloat16
    expected = expected_weight(original, direction, left, right, 1e-2, 1e-3, 1.0)
    # One bfloat16 rounding of the exact result, plus the update's own error if it is formed at TF32
    # precision (10-bit mantissa; far below the weight's rounding except where W and the update cancel).
    update_size = expected_weight(torch.zeros_like(original), direction.abs(), abs_or_none(left), abs_or_none(right),
                                  1e-2, 0.0, 1.0).abs()
    error = (weight.to(torch.float64) - expected).abs()
    bound = 2.0**-8 * expected.abs() + 2.0**-10 * update_size + 1e-9
    assert bool((error <= bound).all()), f"{int((error > bound).sum())} elements off by more than a rounding"
    # The step actually moved the weight (it is not lost to rounding at this size).
    assert not torch.equal(weight, original)
    # The norms are those of the stored (rounded) weight, which is what the next forward uses.
    assert norms.dtype == torch.float32
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", ["left", "none"])
def test_gate_zero_leaves_weight_bit_identical(backend, side, weight_dtype):
    weight, direction, left, right = make_case(17, 33, 3, side, weight_dtype, torch.float32)
    original = weight.clone()
    norms = call(backend, weight, direction, left, right, 0.5, 0.5, 0.0)
    assert torch.equal(weight, original)
    assert_close_scaled(norms, torch.linalg.vector_norm(original.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
def test_decay_alone_scales_the_weight(backend):
    weight, direction, left, right = make_case(17, 33, 3, "right", torch.float64, torch.float64)
    original = weight.clone()
    norms = call(backend, weight, torch.zeros_like(direction), left, right, 0.5, 0.25, 1.0)
    assert_close_scaled(weight, 0.75 * original, 1e-14, "decayed weight")
    assert_close_scaled(norms, 0.75 * torch.linalg.vector_norm(original, dim=1), 1e-14, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_without_norms_the_update_is_the_same(backend, weight_dtype, side, decay):
    weight, direction, left, right = make_case(65, 129, 8, side, weight_dtype, torch.float32)
    twin = weight.clone()
    gate = torch.ones((), device=weight.device)
    norms = run_op(ops.project_back_update, backend, weight, direction, left, right, 1e-2, decay, gate, False)
    run_op(ops.project_back_update, backend, twin, direction, left, right, 1e-2, decay, gate)
    assert norms.shape == (0,) and norms.dtype == torch.float32
    assert torch.equal(weight, twin)
