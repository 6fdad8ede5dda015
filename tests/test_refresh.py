"""Subspace refresh: svd_projector, randomized_projector and orthonormalize."""

import pytest
import torch
from conftest import DEVICE, assert_close_scaled, backend_params, other_backend_params, run_op

from gradnormlorp_kernels import ops
from gradnormlorp_kernels.optimizer import OVERSAMPLE, POWER_ITERS

SIDES = ("left", "right")
DTYPES = (torch.float64, torch.float32)


def with_spectrum(m, n, singular_values, dtype=torch.float64):
    """An (m, n) matrix with the given (descending) singular values and random singular vectors `u`, `v`.

    Built, not measured: tests know the exact SVD without calling one (CPU SVDs are slow here).
    """
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, device=DEVICE)).Q
    v = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, device=DEVICE)).Q
    s = torch.as_tensor(singular_values, dtype=torch.float64, device=DEVICE)
    return ((u * s) @ v.T).to(dtype), u, v


def oriented(matrix, side):
    """The matrix whose column space the projector of `side` spans."""
    return matrix if side == "left" else matrix.T


def assert_orthonormal(projector, tol):
    p = projector.to(torch.float64)
    eye = torch.eye(p.shape[1], dtype=torch.float64, device=p.device)
    assert_close_scaled(p.T @ p, eye, tol, "P^T P")


def residual(matrix, projector):
    g = matrix.to(torch.float64)
    p = projector.to(torch.float64)
    return torch.linalg.matrix_norm(g - p @ (p.T @ g)).item()


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("backend", backend_params("svd_projector"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,rank", [(17, 65, 3), (65, 17, 5), (9, 9, 1), (17, 33, 17)])
def test_svd_projector_is_top_singular_subspace(backend, m, n, rank, side, dtype):
    # A clear gap after `rank` so the subspace is well defined.
    values = torch.cat([torch.linspace(10.0, 5.0, rank), torch.linspace(1.0, 0.1, min(m, n) - rank)])
    matrix, u, v = with_spectrum(m, n, values.tolist(), dtype)
    projector = run_op(ops.svd_projector, backend, matrix, rank, side)
    rows = m if side == "left" else n
    assert projector.shape == (rows, rank)
    assert projector.dtype == dtype
    assert_orthonormal(projector, tolerance(dtype))
    top = u[:, :rank] if side == "left" else v[:, :rank]
    p = projector.to(torch.float64)
    assert_close_scaled(p @ p.T, top @ top.T, 1e-10 if dtype == torch.float64 else 1e-4, "P P^T")


@pytest.mark.parametrize("backend", backend_params("randomized_projector"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("m,n,rank", [(17, 129, 3), (129, 33, 5), (65, 65, 1)])
def test_randomized_captures_exact_low_rank(backend, m, n, rank, side, dtype):
    low_rank, _, _ = with_spectrum(m, n, torch.logspace(1, 0, rank).tolist())
    noise = 1e-9 * torch.randn(m, n, dtype=torch.float64, device=DEVICE)
    matrix = (low_rank + noise).to(dtype)
    projector = run_op(ops.randomized_projector, backend, matrix, rank, side, OVERSAMPLE, POWER_ITERS, 1234)
    rows = m if side == "left" else n
    assert projector.shape == (rows, rank)
    assert projector.dtype == dtype
    assert_orthonormal(projector, tolerance(dtype))
    target = oriented(matrix, side)
    relative = residual(target, projector) / torch.linalg.matrix_norm(target.to(torch.float64)).item()
    assert relative < (1e-7 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", backend_params("randomized_projector"))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("power_iters", [0, POWER_ITERS])
def test_randomized_near_optimal_on_decaying_spectrum(backend, side, power_iters):
    m, n, rank = 129, 97, 8
    values = (torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.0).tolist()
    matrix, _, _ = with_spectrum(m, n, values, torch.float32)
    projector = run_op(ops.randomized_projector, backend, matrix, rank, side, OVERSAMPLE, power_iters, 7)
    assert_orthonormal(projector, 1e-5)
    optimal = sum(value**2 for value in values[rank:]) ** 0.5
    # Halko et al.: a few power iterations bring the range finder close to the SVD's residual.
    factor = 1.5 if power_iters == 0 else 1.02
    assert residual(oriented(matrix, side), projector) <= factor * optimal


@pytest.mark.parametrize("backend", backend_params("randomized_projector"))
def test_randomized_is_deterministic_for_a_seed(backend):
    matrix = torch.randn(65, 33, device=DEVICE)
    args = (matrix, 4, "left", OVERSAMPLE, POWER_ITERS)
    first = run_op(ops.randomized_projector, backend, *args, 99)
    again = run_op(ops.randomized_projector, backend, *args, 99)
    other = run_op(ops.randomized_projector, backend, *args, 100)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("backend", backend_params("randomized_projector"))
@pytest.mark.parametrize("side", SIDES)
def test_randomized_on_zero_matrix(backend, side):
    matrix = torch.zeros(33, 17, device=DEVICE)
    projector = run_op(ops.randomized_projector, backend, matrix, 3, side, OVERSAMPLE, POWER_ITERS, 5)
    assert projector.shape == (33 if side == "left" else 17, 3)
    assert bool(torch.isfinite(projector).all())
    assert_orthonormal(projector, 1e-5)


@pytest.mark.parametrize("backend", backend_params("svd_projector"))
def test_svd_projector_on_zero_matrix(backend):
    projector = run_op(ops.svd_projector, backend, torch.zeros(17, 33, device=DEVICE), 3, "right")
    assert bool(torch.isfinite(projector).all())
    assert_orthonormal(projector, 1e-5)


@pytest.mark.parametrize("entry", [ops.randomized_projector, ops.svd_projector], ids=lambda e: e.op_name)
def test_projector_rejects_unknown_side(entry):
    extra = (OVERSAMPLE, POWER_ITERS, 0) if entry is ops.randomized_projector else ()
    with pytest.raises(ValueError, match="side"):
        entry(torch.randn(9, 5), 2, "top", *extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(17, 3), (129, 9), (5, 5)])
def test_orthonormalize_full_rank(m, k, dtype):
    y = torch.randn(m, k, dtype=dtype, device=DEVICE)
    q = ops.orthonormalize(y)
    assert q.shape == (m, k)
    assert_orthonormal(q, tolerance(dtype))
    q64 = q.to(torch.float64)
    y64 = y.to(torch.float64)
    assert_close_scaled(q64 @ (q64.T @ y64), y64, tolerance(dtype), "span")


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthonormalize_rank_deficient(dtype):
    basis = torch.randn(33, 2, dtype=dtype, device=DEVICE)
    # Columns 3..5 repeat combinations of the first two, the last one is zero.
    repeated = basis @ torch.randn(2, 3, dtype=dtype, device=DEVICE)
    y = torch.cat([basis, repeated, torch.zeros(33, 1, dtype=dtype, device=DEVICE)], 1)
    q = ops.orthonormalize(y)
    assert q.shape == (33, 6)
    assert bool(torch.isfinite(q).all())
    assert_orthonormal(q, tolerance(dtype))
    q64 = q.to(torch.float64)
    y64 = y.to(torch.float64)
    assert_close_scaled(q64 @ (q64.T @ y64), y64, tolerance(dtype), "span")


@pytest.mark.parametrize("dtype,weakest", [(torch.bfloat16, 1e-4), (torch.float32, 1e-6)], ids=["bf16", "fp32"])
def test_keep_apart_keeps_the_span_and_lifts_every_direction(dtype, weakest):
    """Newton-Schulz between the power iteration's products: every singular value of y down to `weakest` of the
    largest brought into [0.6, 1.2] (what keeps the next product from losing it), and y's span kept: each of
    its singular directions u_i lies in x's span up to the rounding of the steps, ~u s_1 / s_i (u the dtype's
    unit roundoff; y's own rounding makes directions weaker than that noise anyway)."""
    from gradnormlorp_kernels.ops import refresh

    m, k = 129, 11
    singular_values = torch.logspace(3, 3 + torch.log10(torch.tensor(weakest)).item(), k, dtype=torch.float64)
    y, u, _ = with_spectrum(m, k, singular_values.tolist(), dtype)
    x = refresh.keep_apart(y)
    assert x.shape == (m, k) and x.dtype == dtype
    values = torch.linalg.svdvals(x.to(torch.float64))
    assert bool((values >= 0.6).all() and (values <= 1.2).all()), values
    q = torch.linalg.qr(x.to(torch.float64)).Q
    outside = torch.linalg.vector_norm(u - q @ (q.T @ u), dim=0)
    # 32: twelve float32 steps amplify the rounding up to ~13-fold (20 seeds); bf16's is y's own (~1.2).
    bound = 32 * (torch.finfo(dtype).eps / 2) * singular_values[0] / singular_values.to(DEVICE)
    tested = bound < 1.0  # where an angle bound says something
    assert int(tested.sum()) >= 3
    assert bool((outside[tested] <= bound[tested]).all()), (outside / bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keep_apart_of_zero_and_non_finite(dtype):
    from gradnormlorp_kernels.ops import refresh

    assert torch.equal(refresh.keep_apart(torch.zeros(9, 4, dtype=dtype, device=DEVICE)),
                       torch.zeros(9, 4, dtype=dtype, device=DEVICE))
    y = torch.randn(9, 4, device=DEVICE).to(dtype)
    y[2, 1] = float("inf")
    assert bool(torch.isnan(refresh.keep_apart(y)).all())


@pytest.mark.parametrize("backend", other_backend_params("svd_projector"))
def test_svd_projector_matches_reference(backend):
    matrix, _, _ = with_spectrum(65, 33, torch.cat([torch.full((4,), 10.0), torch.linspace(1, 0.1, 29)]).tolist())
    ours = run_op(ops.svd_projector, backend, matrix.float(), 4, "left").double()
    expected = ops.svd_projector.reference(matrix.float(), 4, "left").double()
    assert_close_scaled(ours @ ours.T, expected @ expected.T, 1e-4, "P P^T")


@pytest.mark.parametrize("backend", other_backend_params("randomized_projector"))
def test_randomized_projector_matches_reference_subspace(backend):
    # Random streams may differ between backends; the captured subspace of a gapped matrix may not.
    matrix, _, _ = with_spectrum(65, 33, torch.cat([torch.full((4,), 10.0), torch.linspace(1e-3, 1e-4, 29)]).tolist())
    args = (matrix.float(), 4, "right", OVERSAMPLE, POWER_ITERS, 3)
    ours = run_op(ops.randomized_projector, backend, *args).double()
    expected = ops.randomized_projector.reference(*args).double()
    assert_close_scaled(ours @ ours.T, expected @ expected.T, 1e-4, "P P^T")



def _synchronisations(fn) -> int:
    """How many synchronising CUDA calls `fn` makes (torch's sync debug mode, warning for each)."""
    import warnings

    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_orthonormalize_does_not_synchronise_on_gpu():
    y = torch.randn(2048, 136, device="cuda")
    y[:, 100:] = 0.0  # rank-deficient: the case a check of the Cholesky would have to catch on the host
    assert _synchronisations(lambda: ops.orthonormalize(y)) == 0
    assert_orthonormal(ops.orthonormalize(y), 1e-5)


@pytest.mark.gpu
def test_randomized_projector_synchronises_at_most_in_its_eigendecomposition():
    grad = torch.randn(2048, 5461, device="cuda", dtype=torch.bfloat16)
    run = lambda: ops.randomized_projector(grad, 128, "left", OVERSAMPLE, POWER_ITERS, 3)  # noqa: E731
    eigh_alone = _synchronisations(lambda: torch.linalg.eigh(torch.eye(136, device="cuda", dtype=torch.float64)))
    assert _synchronisations(run) <= eigh_alone


@pytest.mark.parametrize("side", SIDES)
def test_randomized_projector_of_non_finite_matrix_is_nan(side):
    """Decided without a host synchronisation: the optimizer keeps its old projector on a NaN result."""
    matrix = torch.randn(33, 17, device=DEVICE)
    matrix[4, 5] = float("inf")
    projector = ops.randomized_projector(matrix, 3, side, OVERSAMPLE, POWER_ITERS, 5)
    assert bool(torch.isnan(projector).all())


@pytest.mark.parametrize("side", SIDES)
def test_randomized_on_bf16_gradient_near_optimal(side):
    """bf16 gradients are sketched in bf16 (no float32 copy): the captured subspace is still near the SVD's."""
    m, n, rank = 129, 97, 8
    values = (torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.0).tolist()
    matrix, _, _ = with_spectrum(m, n, values, torch.bfloat16)
    projector = ops.randomized_projector(matrix, rank, side, OVERSAMPLE, POWER_ITERS, 7)
    assert projector.dtype == torch.float32
    assert_orthonormal(projector, 1e-5)
    exact = matrix.to(torch.float64)
    optimal = torch.linalg.svdvals(exact)[rank:].square().sum().sqrt().item()
    assert residual(oriented(exact, side), projector) <= 1.03 * optimal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sketch_inputs_into_buffers_are_the_same_draws(dtype):
    """The optimizer's graphed sketch fills static buffers; the eager op draws fresh tensors: same values."""
    from gradnormlorp_kernels.ops import refresh

    g = torch.randn(37, 21, device=DEVICE).to(dtype)
    fresh = refresh.sketch_inputs(g, 6, seed=17)
    buffers = tuple(torch.full_like(t, float("nan")) for t in fresh)
    filled = refresh.sketch_inputs(g, 6, seed=17, out=buffers)
    assert all(a is b for a, b in zip(filled, buffers))
    for a, b in zip(fresh, filled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("healthy", [True, False])
def test_write_ritz_projector_writes_the_rayleigh_ritz_projector_or_keeps_the_old_one(healthy):
    """The optimizer's finish (eigendecomposition, then a capturable write) is `rayleigh_ritz`, written in
    place only when it is finite."""
    grad = torch.randn(37, 23, device=DEVICE)
    g = ops.refresh.oriented(grad, "left")
    k = ops.refresh.sketch_size(g.shape, 5, OVERSAMPLE)
    basis, gram, ok = ops.refresh.sketch(g, *ops.refresh.sketch_inputs(g, k, 7), POWER_ITERS)
    ok = ok & healthy
    kept = torch.randn(37, 5, device=DEVICE).to(torch.bfloat16)
    old = kept.clone()
    vectors = ops.refresh.ritz_vectors(gram, ok)
    ops.refresh.write_ritz_projector(kept, basis, vectors, ok, 5)
    expected = ops.refresh.rayleigh_ritz(basis, gram, ok, 5).to(torch.bfloat16)
    if healthy:
        assert torch.equal(kept, expected)
        assert_orthonormal(kept.double(), 2e-2)
    else:
        assert bool(torch.isnan(expected).all())
        assert torch.equal(kept, old)


def test_sketch_run_over_steps_is_the_sketch_of_the_gradient_it_began_with():
    """A sketch spread over steps keeps its gradient: changing the caller's gradient between parts changes
    nothing, and the parts give `sketch`'s bits."""
    from gradnormlorp_kernels._step_graph import SketchRun

    grad = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    k = ops.refresh.sketch_size(grad.shape, 4, OVERSAMPLE)
    expected = ops.refresh.sketch(grad, *ops.refresh.sketch_inputs(grad, k, 11), POWER_ITERS)
    run = SketchRun(grad, "left", k, POWER_ITERS, 11, keep_grad=True)
    results = []
    while run.busy:
        results.append(run.advance())
        grad.normal_()  # the caller's gradient moves on
    assert results[:-1] == [None] * (ops.refresh.sketch_parts(POWER_ITERS) - 1)
    for got, want in zip(results[-1], expected):
        assert torch.equal(got, want)
