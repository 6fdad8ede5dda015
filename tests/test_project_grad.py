"""project_grad: the optimizer's projection P^T G, G Q or P^T G Q, in the gradient's dtype (one rounding)."""

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
    other_backend_params,
    poisoned_empty,
    run_op,
)

from gradnormlorp_kernels import ops

SIDES = ("left", "right", "both")
# How far our error may exceed torch.matmul's in the same dtype. float32: cuBLAS's float32 GEMM on an H100
# sums far more accurately than one running float32 accumulator per K block (measured: 2.0-3.2x its error,
# about 1e-7 relative either way), so float32 gets a wider factor than the rounding-dominated bf16.
FACTOR = {torch.float32: 4.0, torch.bfloat16: 2.0, torch.float16: 2.0}
# (m, n, r): odd sizes, single rows / columns / rank; the two-sided case's right rank is r + 2.
SHAPES = [(37, 53, 5), (1, 1, 1), (1, 53, 5), (37, 1, 3), (70, 41, 20)]
# The real shapes: LLaMA-1B's down projection (rows not 16-byte aligned) and its transpose, a square weight.
GPU_CASES = [(2048, 5461, 128, "left"), (5461, 2048, 128, "right"), (2048, 2048, 128, "both"),
             (2048, 5461, 512, "left")]


def make_case(m, n, r, side, dtype, grad=None):
    grad = torch.randn(m, n, device=DEVICE).to(dtype) if grad is None else grad
    left = (torch.randn(m, r, device=DEVICE) / m**0.5).to(dtype) if side in ("left", "both") else None
    right = (torch.randn(n, r + 2, device=DEVICE) / n**0.5).to(dtype) if side in ("right", "both") else None
    return grad, left, right


def exact(grad, left, right):
    """The product in float64 (of the inputs as given), no rounding."""
    result = grad.to(torch.float64)
    if left is not None:
        result = left.to(torch.float64).T @ result
    if right is not None:
        result = result @ right.to(torch.float64)
    return result


def plain_torch(grad, left, right):
    """What the optimizer would write without the op: torch.matmul in the gradient's dtype."""
    result = grad
    if left is not None:
        result = left.T @ result
    if right is not None:
        result = result @ right
    return result


def call(backend, grad, left, right):
    return run_op(ops.project_grad, backend, grad, left, right)


@pytest.mark.parametrize("backend", backend_params("project_grad"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES + [(0, 5, 3), (4, 0, 2)])
def test_float64(backend, m, n, r, side):
    grad, left, right = make_case(m, n, r, side, torch.float64)
    result = call(backend, grad, left, right)
    assert result.dtype == torch.float64
    assert_close_scaled(result, exact(grad, left, right), 1e-12, "projection")


@pytest.mark.parametrize("backend", backend_params("project_grad"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,r", SHAPES + [pytest.param(*c[:3], marks=pytest.mark.gpu) for c in GPU_CASES])
def test_low_precision(backend, dtype, side, m, n, r):
    grad, left, right = make_case(m, n, r, side, dtype)
    result = call(backend, grad, left, right)
    assert result.dtype == dtype
    assert result.shape == plain_torch(grad, left, right).shape
    # At most twice as far from the float64 truth as torch.matmul in `dtype`, plus a fraction of one rounding.
    assert_within_baseline(result, plain_torch(grad, left, right), exact(grad, left, right), dtype, factor=FACTOR[dtype],
                           name=f"{side} projection")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,r,side", GPU_CASES)
def test_real_shapes_deterministic_and_graph_replay(m, n, r, side):
    grad, left, right = make_case(m, n, r, side, torch.bfloat16)
    first = call("triton", grad, left, right)
    assert torch.equal(first, call("triton", grad, left, right)), "two calls differ"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.project_grad(grad, left, right)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first), "CUDA-graph replay differs from eager"


@pytest.mark.parametrize("backend", other_backend_params("project_grad"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("side", SIDES)
def test_matches_reference(backend, dtype, side):
    args = list(make_case(70, 41, 20, side, dtype))
    # Summation orders differ: bf16 results may round to the neighbouring value.
    assert_matches_reference(ops.project_grad, backend, args, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", backend_params("project_grad"))
@pytest.mark.parametrize("side", SIDES)
def test_poisoned_buffers_deterministic(backend, side):
    # Every torch.empty (output, split-K workspace, two-sided intermediate) starts as NaN: an element left
    # unwritten shows. Repeated calls give the same bits.
    grad, left, right = make_case(70, 41, 20, side, torch.bfloat16)
    clean = call(backend, grad, left, right)
    with poisoned_empty():
        poisoned = call(backend, grad, left, right)
        again = call(backend, grad, left, right)
    assert not bool(poisoned.isnan().any()), "an output element was never written"
    assert torch.equal(poisoned, clean) and torch.equal(again, clean), "calls differ"


@pytest.mark.parametrize("backend", backend_params("project_grad"))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("side", SIDES)
def test_strided_inputs(backend, dtype, side):
    # A transposed gradient and projectors that are transposes / slices of larger matrices are read in place.
    m, n, r = 37, 53, 5
    grad = torch.randn(n, m, device=DEVICE).to(dtype).T
    _, left, right = make_case(m, n, r, side, dtype, grad)
    if left is not None:
        left = torch.randn(r, m, device=DEVICE).to(dtype).T
    if right is not None:
        right = torch.randn(n, 2 * (r + 2), device=DEVICE).to(dtype)[:, ::2]
    result = call(backend, grad, left, right)
    contiguous = call(backend, grad.contiguous(), *(None if p is None else p.contiguous() for p in (left, right)))
    assert_within_baseline(result, plain_torch(grad, left, right), exact(grad, left, right), dtype, factor=FACTOR[dtype])
    if backend == "triton":  # same tiles, same order: the layout does not change the bits
        assert torch.equal(result, contiguous)


@pytest.mark.parametrize("backend", other_backend_params("project_grad"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_misaligned_gradient_same_bits_as_aligned(backend, dtype):
    # Rows of 41 elements: the Triton path copies such a gradient padded (`aligned_rows`) before a rank of
    # several tiles reads it; the result must not depend on whether the caller's rows were aligned.
    grad, left, _ = make_case(70, 41, 20, "left", dtype)
    aligned = ops.aligned_rows(grad)
    assert aligned.stride(0) != grad.stride(0)
    with poisoned_empty():
        misaligned_result = call(backend, grad, left, None)
    assert torch.equal(misaligned_result, call(backend, aligned, left, None))
    assert_within_baseline(misaligned_result, plain_torch(grad, left, None), exact(grad, left, None), dtype,
                           factor=FACTOR[dtype])


BAD_CASES = {
    "neither": (lambda g: (g, None, None), r"needs `left` \(m, r\), `right` \(n, r\) or both"),
    "grad-1d": (lambda g: (g[0], g[:, :2], None), r"grad must be a 2-D \(m, n\) tensor, got shape \(9,\)"),
    "grad-int": (lambda g: (g.to(torch.int32), g[:, :2].to(torch.int32), None), r"grad's dtype must be one of"),
    "left-rows": (lambda g: (g, g[:5, :2], None), r"left must be a 2-D \(m, r\) tensor with m = grad.shape\[0\] = 6"),
    "right-rows": (lambda g: (g, None, g[:, :2]), r"right must be a 2-D \(n, r\) tensor with n = grad.shape\[1\] = 9"),
    "left-1d": (lambda g: (g, g[:, 0], None), r"left must be a 2-D \(m, r\) tensor"),
    "left-dtype": (lambda g: (g, g[:, :2].double(), None), r"left must have grad's dtype torch.float32"),
    "right-list": (lambda g: (g, None, [[1.0]] * 9), r"right must be a tensor or None, got list"),
    "right-device": (lambda g: (g, None, torch.empty(9, 2, device="meta")), r"right must be on grad's device"),
}


@pytest.mark.parametrize("backend", backend_params("project_grad"))
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_arguments(backend, case):
    make, message = BAD_CASES[case]
    args = make(torch.randn(6, 9, device=DEVICE))
    with pytest.raises(ValueError, match=message):
        call(backend, *args)


# Every tile the kernel may use on a GPU, forced one at a time with split-K (three splits, the last one
# shorter, partial tiles in every dimension); float32 tiles with float32 inputs, tensor-core tiles with bf16.
TRITON = "triton" in backends_for("project_grad")
if TRITON:
    from gradnormlorp_kernels.triton import project_grad as triton_project_grad


def triton_configs():
    if not TRITON:
        return [pytest.param(None, None, id="none", marks=pytest.mark.skip(reason="the Triton backend does not load"))]
    module = triton_project_grad
    cases = [(c, torch.bfloat16) for c in module.CONFIGS] + [(c, torch.float32) for c in module.FP32_CONFIGS]
    cases += [(module._INTERPRETED, dtype) for dtype in LOW_PRECISION]
    return [pytest.param(c, dtype, id="-".join(f"{k}{v}" for k, v in c.kwargs.items())
                         + f"-w{c.num_warps}-s{c.num_stages}-{str(dtype)[6:]}") for c, dtype in cases]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("config,dtype", triton_configs())
def test_triton_every_config(config, dtype, side):
    block_r, block_l, block_k = (config.kwargs[k] for k in ("BLOCK_R", "BLOCK_L", "BLOCK_K"))
    r = block_r + 3
    long = 5 * block_k + 3  # the reduced dimension: three splits of 2, 2 and 1 (partial) K blocks
    other = block_l + 5
    m, n = (long, other) if side != "right" else (other, long)
    grad, left, right = make_case(m, n, r, side, dtype)
    result = triton_project_grad.project_grad(grad, left, right, config=config, splits=3)
    assert_within_baseline(result, plain_torch(grad, left, right), exact(grad, left, right), dtype, factor=FACTOR[dtype])
    if side != "both":
        single = triton_project_grad.project_grad(grad, left, right, config=config, splits=1)
        assert_within_baseline(single, plain_torch(grad, left, right), exact(grad, left, right), dtype, factor=FACTOR[dtype])
