"""project_back_update: W <- W (1 - gate decay) - gate step (P N Q^T) in place, returning the new row norms."""

import pytest
import torch
from conftest import DEVICE, assert_close_scaled, backend_params, poisoned_empty, run_op

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
    if rounds_factors(backend) and side in ("left", "right"):
        # One-sided: the product of the factors rounded to bf16, W decayed, one rounding (see below).
        exact, magnitude = one_sided_expected(original, direction.to(torch.bfloat16), left, right, 1e-2, 1.0 - 1e-3)
        assert_within(weight, exact, one_sided_bound(backend, original, exact, magnitude, r))
    else:
        expected = expected_weight(original, direction, left, right, 1e-2, 1e-3, 1.0)
        # One bfloat16 rounding of the exact result, plus the update's own error if it is formed at TF32
        # precision (10-bit mantissa; far below the weight's rounding except where W and the update cancel).
        update_size = expected_weight(torch.zeros_like(original), direction.abs(), abs_or_none(left),
                                      abs_or_none(right), 1e-2, 0.0, 1.0).abs()
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


# ---- direction_gated, and the one-sided bf16/fp16 update --------------------------------------------------------
#
# With one projector and a bf16/fp16 weight, the triton backend forms W (1 - gate decay) - step (A B) from factors
# rounded to W's dtype (the gated direction bf16(N gate), or the given gated direction, and the projector),
# accumulated in float32 (cuBLAS addmm where rows are 16-byte aligned on a GPU and there is no decay, else its own
# kernel; always that kernel under the interpreter). The reference and the compiled kernels multiply the float32
# factors instead.

NARROW_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# (out, in, r, dtype): odd sizes across the kernel's 64 x 64 x 64 tiles; (40, 136) has 16-byte-aligned rows (the
# addmm path on a GPU); r = 67 takes two passes over the rank. fp16 on a few only (the interpreter is slow).
ONE_SIDED_CASES = [
    pytest.param(37, 129, 8, torch.bfloat16, id="37x129r8-bf16"),
    pytest.param(17, 241, 5, torch.bfloat16, id="17x241r5-bf16"),
    pytest.param(65, 130, 16, torch.bfloat16, id="65x130r16-bf16"),
    pytest.param(40, 136, 8, torch.bfloat16, id="40x136r8-bf16"),
    pytest.param(33, 75, 67, torch.bfloat16, id="33x75r67-bf16"),
    pytest.param(37, 129, 8, torch.float16, id="37x129r8-fp16"),
    pytest.param(33, 75, 67, torch.float16, id="33x75r67-fp16"),
]
GATE = 0.37
STEP = 0.3  # large enough that step * (A B) is of the order of W: the factors' rounding shows in the result
FLOAT32_ROUNDING = 2.0**-24


def rounds_factors(backend: str) -> bool:
    """Whether `backend` rounds the factors of a one-sided bf16/fp16 update to the weight's dtype."""
    return backend == "triton"


def one_sided_case(out, inp, r, side, dtype, device=DEVICE):
    """(weight, float32 direction, left, right) for a one-sided update of a `dtype` weight."""
    weight, direction, left, right = make_case(out, inp, r, side, dtype, torch.float32)
    if device != DEVICE:
        weight, direction = weight.to(device), direction.to(device)
        left = None if left is None else left.to(device)
        right = None if right is None else right.to(device)
    return weight, direction, left, right


def gated_direction(direction, gate, dtype):
    """bf16(N gate) (or fp16): the float32 product rounded to the weight's dtype."""
    return (direction * gate).to(dtype)


def rounded_factors(gated, left, right, dtype):
    """The factors (A, B) of the update A @ B, rounded to `dtype`, in float64."""
    if left is not None:
        return left.to(dtype).to(torch.float64), gated.to(dtype).to(torch.float64)
    return gated.to(dtype).to(torch.float64), right.to(dtype).T.to(torch.float64)


def one_sided_expected(weight, gated, left, right, step_size, keep=1.0):
    """(W keep - step A B exactly, step |A| @ |B|) in float64, from the factors rounded to W's dtype; `keep` is the
    decay's factor 1 - gate decay, as the kernel reads it (a float32)."""
    a, b = rounded_factors(gated, left, right, weight.dtype)
    keep = torch.tensor(keep, dtype=torch.float32).item()
    return weight.to(torch.float64) * keep - step_size * (a @ b), step_size * (a.abs() @ b.abs())


def one_sided_bound(backend, original, exact, magnitude, rank):
    """How far the stored weight may be from `exact`, elementwise.

    The kernel rounds y, its float32 W - step A B, once to W's dtype: |round(y) - exact| <= u |exact| + (1 + u)
    |y - exact|. In y the products of the rounded factors are exact in float32 (8- or 11-bit significands), their
    sum in any order is off by at most (r - 1) u32 |A| @ |B|, the step (rounded to float32) and its product by one
    u32 each, and the subtraction from W by one u32 of |y| <= |W| + step |A| @ |B|; twice that for slack. A
    backend that multiplies the unrounded float32 factors moves the product by up to (2u + u^2) |A| @ |B| more.
    """
    u = torch.finfo(original.dtype).eps / 2
    accumulation = 2 * FLOAT32_ROUNDING * ((rank + 2) * magnitude + original.to(torch.float64).abs() + exact.abs())
    bound = u * exact.abs() + (1 + u) * accumulation
    if not rounds_factors(backend):
        bound = bound + (1 + u) * (2 * u + u * u) * (1 + u) ** 2 * magnitude
    if backend == "triton" and original.is_cuda and (original.stride(0) * original.element_size()) % 16 == 0:
        # cuBLAS's addmm (aligned rows): torch lets it round partial sums to the 16-bit dtype by default
        # (allow_bf16/fp16_reduced_precision_reduction), one more rounding of the product, and of a partial sum.
        bound = bound + 2 * u * magnitude
    return bound


def assert_within(weight, exact, bound, name="weight"):
    error = (weight.to(torch.float64) - exact).abs()
    assert bool(torch.isfinite(weight).all()), f"{name}: non-finite values"
    worst = (error / bound).max().item()
    outside = int((error > bound).sum())
    assert outside == 0, f"{name}: {outside} elements out of bound (worst at {worst:.2f} x the bound)"


def call_gated(backend, weight, direction, left, right, step_size, decay, gate, direction_gated, with_norm=True):
    gate_tensor = torch.tensor(gate, dtype=torch.float32, device=weight.device)
    return run_op(ops.project_back_update, backend, weight, direction, left, right, step_size, decay, gate_tensor,
                  with_norm, direction_gated)


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("out,inp,r,dtype", ONE_SIDED_CASES)
def test_one_sided_narrow_matches_rounded_factors(backend, side, out, inp, r, dtype):
    """N with the gate, and bf16(N gate) with direction_gated: both within one rounding (plus the float32
    accumulation) of W - step A B formed exactly from the rounded factors; on a backend that rounds the factors,
    the same bits both ways (what the optimizer's flat path relies on when it passes pre-gated directions)."""
    weight, direction, left, right = one_sided_case(out, inp, r, side, dtype)
    original = weight.clone()
    twin = weight.clone()
    gated = gated_direction(direction, torch.tensor(GATE, dtype=torch.float32, device=DEVICE), dtype)
    exact, magnitude = one_sided_expected(original, gated, left, right, STEP)
    bound = one_sided_bound(backend, original, exact, magnitude, r)
    addresses = weight.data_ptr(), twin.data_ptr()
    with poisoned_empty():
        norms = call_gated(backend, weight, direction, left, right, STEP, 0.0, GATE, False)
        twin_norms = call_gated(backend, twin, gated, left, right, STEP, 0.0, GATE, True)
    assert (weight.data_ptr(), twin.data_ptr()) == addresses, "the weight must be updated in place"
    for name, result, result_norms in (("direction and gate", weight, norms), ("gated direction", twin, twin_norms)):
        assert result.dtype == dtype
        assert_within(result, exact, bound, name)
        assert not torch.equal(result, original), f"{name}: the step was lost"
        assert result_norms.dtype == torch.float32 and result_norms.shape == (out,)
        assert_close_scaled(result_norms, torch.linalg.vector_norm(result.to(torch.float64), dim=1), 1e-6,
                            f"{name}: norms")
    if rounds_factors(backend):
        assert torch.equal(weight, twin), "direction and gate vs the gated direction: different bits"
        assert torch.equal(norms, twin_norms)


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("gate,decay", [(GATE, 0.1), (0.0, 0.1), (GATE, 0.0)], ids=["decay", "gate0-decay", "nodecay"])
def test_gated_direction_scales_only_the_decay(backend, dtype, side, gate, decay):
    """W (1 - gate decay) - step (P N Q^T): the gate does not multiply the update (with gate 0 the weight still
    moves by the whole update, only its decay is gone)."""
    weight, direction, left, right = make_case(37, 129, 8, side, dtype, dtype)
    original = weight.clone()
    address = weight.data_ptr()
    with poisoned_empty():
        norms = call_gated(backend, weight, direction, left, right, STEP, decay, gate, True)
    assert weight.data_ptr() == address, "the weight must be updated in place"
    gate = torch.tensor(gate, dtype=torch.float32).item()  # the gate the op reads (a float32 tensor)
    update = expected_weight(torch.zeros_like(original), direction, left, right, 1.0, 0.0, -1.0)
    expected = original.to(torch.float64) * (1.0 - gate * decay) - STEP * update
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close_scaled(weight, expected, rtol, "weight")
    assert norms.dtype == dtype
    assert_close_scaled(norms, torch.linalg.vector_norm(expected, dim=1), rtol, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inp", [130, 136], ids=["misaligned", "aligned"])
def test_gated_direction_with_decay_bfloat16(backend, side, inp):
    """A decaying bf16 weight with a gated bf16 direction: one rounding of the exact result, plus the update's error
    at TF32 precision (the general path), or of the product of the rounded factors (the one-sided kernel, whose
    tile differs for 16-byte aligned rows)."""
    weight, direction, left, right = make_case(65, inp, 16, side, torch.bfloat16, torch.float32)
    gated = direction.to(torch.bfloat16)
    original = weight.clone()
    norms = call_gated(backend, weight, gated, left, right, STEP, 0.1, GATE, True)
    if rounds_factors(backend) and side in ("left", "right"):  # the one-sided kernel, its factors rounded
        gate = torch.tensor(GATE, dtype=torch.float32).item()
        exact, magnitude = one_sided_expected(original, gated, left, right, STEP, 1.0 - gate * 0.1)
        assert_within(weight, exact, one_sided_bound(backend, original, exact, magnitude, 16))
        assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")
        return
    update = expected_weight(torch.zeros_like(original), gated, left, right, 1.0, 0.0, -1.0)
    expected = original.to(torch.float64) * (1.0 - GATE * 0.1) - STEP * update
    update_size = expected_weight(torch.zeros_like(original), gated.abs(), abs_or_none(left), abs_or_none(right),
                                  STEP, 0.0, 1.0).abs()
    error = (weight.to(torch.float64) - expected).abs()
    bound = 2.0**-8 * expected.abs() + 2.0**-10 * update_size + 1e-9
    assert bool((error <= bound).all()), f"{int((error > bound).sum())} elements off by more than a rounding"
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("dtype", NARROW_DTYPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_gate_zero_leaves_one_sided_narrow_weight_bit_identical(backend, dtype, side):
    weight, direction, left, right = one_sided_case(37, 129, 8, side, dtype)
    original = weight.clone()
    with poisoned_empty():
        norms = call_gated(backend, weight, direction, left, right, STEP, 0.0, 0.0, False)
    assert torch.equal(weight, original)
    assert_close_scaled(norms, torch.linalg.vector_norm(original.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("direction_gated", [False, True], ids=["ungated", "gated"])
def test_one_sided_narrow_with_and_without_norms(backend, side, direction_gated):
    dtype = torch.bfloat16
    weight, direction, left, right = one_sided_case(17, 241, 5, side, dtype)
    if direction_gated:
        direction = gated_direction(direction, torch.tensor(GATE, dtype=torch.float32, device=DEVICE), dtype)
    twin = weight.clone()
    addresses = weight.data_ptr(), twin.data_ptr()
    with poisoned_empty():
        norms = call_gated(backend, weight, direction, left, right, STEP, 0.0, GATE, direction_gated, True)
        none = call_gated(backend, twin, direction, left, right, STEP, 0.0, GATE, direction_gated, False)
    assert (weight.data_ptr(), twin.data_ptr()) == addresses, "the weight must be updated in place"
    assert torch.equal(weight, twin)
    assert none.shape == (0,) and none.dtype == torch.float32
    assert norms.shape == (17,) and norms.dtype == torch.float32
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.parametrize("backend", backend_params("project_back_update"))
@pytest.mark.parametrize("dtype", NARROW_DTYPES)
def test_one_sided_narrow_misaligned_direction_same_bits(backend, dtype):
    """A gated direction with rows of 129 elements (copied padded by the Triton path before its GEMM) and the
    same direction in aligned rows: the same weight bits."""
    weight, direction, left, _ = one_sided_case(37, 129, 8, "left", dtype)
    gated = gated_direction(direction, torch.tensor(GATE, dtype=torch.float32, device=DEVICE), dtype)
    aligned = ops.aligned_rows(gated)
    assert aligned.stride(0) != gated.stride(0)
    twin = weight.clone()
    with poisoned_empty():
        call_gated(backend, weight, gated, left, None, STEP, 0.0, GATE, True, False)
    call_gated(backend, twin, aligned, left, None, STEP, 0.0, GATE, True, False)
    assert torch.equal(weight, twin)


@pytest.mark.parametrize(
    "backend", [p for p in backend_params("project_back_update") if p.values[0] in ("triton", "reference")]
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_one_sided_narrow_strided_weight(backend, side):
    """A weight whose rows are a column slice of a wider buffer (stride > width): the slice is updated, the
    rest of the buffer left as it was. (The compiled kernels require a contiguous weight.)"""
    out, inp, r = 37, 129, 8
    buffer = torch.randn(out, inp + 11, device=DEVICE).to(torch.bfloat16)
    before = buffer.clone()
    weight = buffer[:, 3:3 + inp]
    _, direction, left, right = one_sided_case(out, inp, r, side, torch.bfloat16)
    original = weight.clone()
    gated = gated_direction(direction, torch.tensor(GATE, dtype=torch.float32, device=DEVICE), torch.bfloat16)
    exact, magnitude = one_sided_expected(original, gated, left, right, STEP)
    norms = call_gated(backend, weight, direction, left, right, STEP, 0.0, GATE, False)
    assert_within(weight, exact, one_sided_bound(backend, original, exact, magnitude, r))
    assert torch.equal(buffer[:, :3], before[:, :3]) and torch.equal(buffer[:, 3 + inp:], before[:, 3 + inp:])
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.gpu
@pytest.mark.parametrize("side,out,inp", [("left", 2048, 2048), ("left", 2048, 5461), ("right", 5461, 2048)])
@pytest.mark.parametrize("r", [128, 512])
def test_one_sided_llama_sizes_with_decay(side, out, inp, r):
    """The optimizer's call with decay at LLaMA-1B's shapes (the one-sided kernel on every one: its larger tile on
    the aligned rows, the smaller on 5461-wide ones), against the float64 update of the rounded factors."""
    weight, direction, left, right = one_sided_case(out, inp, r, side, torch.bfloat16, device="cuda")
    original = weight.clone()
    gate = torch.tensor(GATE, dtype=torch.float32, device="cuda")
    gated = gated_direction(direction, gate, torch.bfloat16)
    exact, magnitude = one_sided_expected(original, gated, left, right, 1e-2, 1.0 - gate.item() * 0.1)
    norms = call_gated("triton", weight, gated, left, right, 1e-2, 0.1, GATE, True)
    assert_within(weight, exact, one_sided_bound("triton", original, exact, magnitude, r))
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")


@pytest.mark.gpu
@pytest.mark.parametrize("side,out,inp", [("left", 2048, 5461), ("right", 5461, 2048)])
@pytest.mark.parametrize("direction_gated", [False, True], ids=["ungated", "gated"])
def test_one_sided_llama_sizes(side, out, inp, direction_gated):
    """LLaMA's MLP shapes, rank 128, bf16, no decay: 2048 x 5461 (rows not 16-byte aligned: the Triton kernel)
    and 5461 x 2048 (cuBLAS addmm), against the float64 update of the rounded factors."""
    r, dtype = 128, torch.bfloat16
    weight, direction, left, right = one_sided_case(out, inp, r, side, dtype, device="cuda")
    original = weight.clone()
    gate = torch.tensor(GATE, dtype=torch.float32, device="cuda")
    gated = gated_direction(direction, gate, dtype)
    exact, magnitude = one_sided_expected(original, gated, left, right, 1e-2)
    address = weight.data_ptr()
    norms = call_gated("triton", weight, gated if direction_gated else direction, left, right, 1e-2, 0.0, GATE,
                       direction_gated)
    assert weight.data_ptr() == address
    assert_within(weight, exact, one_sided_bound("triton", original, exact, magnitude, r))
    assert not torch.equal(weight, original)
    assert_close_scaled(norms, torch.linalg.vector_norm(weight.to(torch.float64), dim=1), 1e-6, "norms")
