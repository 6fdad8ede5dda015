"""Shared test set-up: Triton's interpreter on CPU-only machines, seeding, backends per op, tolerances.

The op tests parametrise over every backend that implements an op and can run on the test device
(`backend_params`), so a kernel registered by any backend is checked by the same tests as the reference.
"""

import contextlib
import os
import zlib

import torch

if not torch.cuda.is_available():
    # Before anything imports triton (bitsandbytes does): Triton reads the flag when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gradnormlorp_kernels import _dispatch, use_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = (torch.float32, torch.bfloat16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A seed per test (stable across runs, different between tests; $GRADNORMLORP_TEST_SEED shifts all)."""
    value = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("GRADNORMLORP_TEST_SEED", "0"))
    torch.manual_seed(value)
    return value


def backends_for(op_name: str, device_type: str = DEVICE) -> list[str]:
    """Backends that implement `op_name`, load here, and may run on `device_type` (reference last)."""
    return [b for b in _dispatch.implementations(op_name) if _dispatch._device_allows(b, device_type)]


def backend_params(op_name: str, device_type: str = DEVICE) -> list:
    """`pytest.param`s for every backend of `op_name` on the test device."""
    return [pytest.param(b, id=b) for b in backends_for(op_name, device_type)]


def other_backend_params(op_name: str, device_type: str = DEVICE) -> list:
    """`pytest.param`s for the non-reference backends of `op_name`; one skipped param when there are none."""
    others = [b for b in backends_for(op_name, device_type) if b != "reference"]
    if not others:
        reason = f"no backend other than the reference implements {op_name} on {device_type} here"
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(b, id=b) for b in others]


def interpreted(backend: str) -> bool:
    """True when `backend` runs under Triton's CPU interpreter (slow: tests keep its sizes small)."""
    return backend == "triton" and DEVICE == "cpu"


def run_op(entry, backend: str, *args):
    """Call op `entry` with `backend` forced and check that backend (not a fallback) was selected."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with _dispatch.use_backend(backend):
        chosen, _ = _dispatch.select(entry.op_name, device_type)
        assert chosen == backend, f"{entry.op_name}: asked for {backend}, dispatch chose {chosen}"
        return entry(*args)


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block torch.empty returns NaN (floats) or 0xA5 (integers) everywhere, so an output element
    that a kernel leaves unwritten shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 0xA5)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", poisoned)
        yield


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (0 when both are all zero)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), "non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return error
    return error / scale


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, name: str = "", atol: float = 0.0
) -> None:
    """Every element within `rtol` times the largest |expected| (robust where entries cross zero), or `atol`
    (for results that are exactly zero in theory, e.g. the gradient of a 1 x 1 normalised weight)."""
    error = scaled_error(actual, expected)
    if atol:
        absolute = (actual.detach().to(torch.float64).cpu() - expected.detach().to(torch.float64).cpu()).abs().max()
        if absolute.item() <= atol:
            return
    assert error <= rtol, f"{name}: scaled error {error:.3e} > {rtol:.1e}"


def low_precision_floor(dtype: torch.dtype) -> float:
    """Absolute floor for the baseline comparison: a fraction of one rounding of `dtype`."""
    return 0.25 * torch.finfo(dtype).eps


def assert_within_baseline(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    truth: torch.Tensor,
    dtype: torch.dtype,
    factor: float = 4.0,
    name: str = "",
) -> None:
    """`actual` is at most `factor` times as far from the float64 `truth` as a plain PyTorch `baseline`
    computed in `dtype`, plus a small floor."""
    ours = scaled_error(actual, truth)
    reference = scaled_error(baseline, truth)
    bound = factor * reference + low_precision_floor(dtype)
    assert ours <= bound, f"{name}: error {ours:.3e} > {factor} x baseline {reference:.3e} + floor ({dtype})"


def clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def assert_matches_reference(entry, backend: str, args, rtol: float, compare_args: bool = True) -> None:
    """Run `backend` and the reference on copies of `args`; outputs (and mutated args) must agree."""
    ours_args = clone_args(args)
    reference_args = clone_args(args)
    ours = run_op(entry, backend, *ours_args)
    expected = entry.reference(*reference_args)
    ours = ours if isinstance(ours, tuple) else (ours,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(ours) == len(expected)
    for i, (a, e) in enumerate(zip(ours, expected)):
        assert a.dtype == e.dtype, f"{entry.op_name} output {i}: dtype {a.dtype} != reference {e.dtype}"
        assert_close_scaled(a, e, rtol, name=f"{entry.op_name} output {i}")
    if compare_args:
        for i, (a, e) in enumerate(zip(ours_args, reference_args)):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                assert_close_scaled(a, e, rtol, name=f"{entry.op_name} argument {i}")
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, e), f"{entry.op_name} argument {i} differs from the reference"


# ---- the dense formulas of DESIGN.md section 2, differentiated by autograd ----


def dense_adapter_weight(base_weight, lora_A, lora_B, magnitude, scaling, detach_norm=False):
    """`(W, n)`: W = diag(M / n) (W0 + s B A), n = ||W0 + s B A||_row, formed densely."""
    merged = base_weight + scaling * (lora_B @ lora_A)
    norm = torch.linalg.vector_norm(merged, dim=1)
    if detach_norm:
        norm = norm.detach()
    return (magnitude / norm)[:, None] * merged, norm


def dense_full_weight(direction, magnitude, detach_norm=False):
    """`(W, n)`: W = diag(M / n) V, n = ||V||_row."""
    norm = torch.linalg.vector_norm(direction, dim=1)
    if detach_norm:
        norm = norm.detach()
    return (magnitude / norm)[:, None] * direction, norm


def dense_linear(x, weight, bias):
    y = x @ weight.T
    return y if bias is None else y + bias


def autograd_dense(weight_fn, x, params: dict, bias, grad_out):
    """Output, row norms and the gradients of `sum(y * grad_out)` w.r.t. x and every tensor in `params`.

    `weight_fn(**params)` returns the dense `(W, n)`; bias is a constant.
    """
    x = x.detach().clone().requires_grad_(True)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    weight, norm = weight_fn(**leaves)
    y = dense_linear(x, weight, bias)
    grads = torch.autograd.grad(y, [x, *leaves.values()], grad_out)
    return y.detach(), norm.detach(), dict(zip(["x", *leaves], grads))


@pytest.fixture
def reference_unless_dispatched(request):
    """Reference ops (fast on CPU, where Triton runs interpreted), except in tests that take the
    `dispatched` fixture: those run with whatever backend the dispatcher picks."""
    with use_backend("auto" if "dispatched" in request.fixturenames else "reference"):
        yield


@pytest.fixture
def dispatched():
    """Marker fixture: run this test through the dispatcher's own backend choice."""
    return None
