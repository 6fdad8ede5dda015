"""Subspace refresh: an orthonormal basis of the gradient's dominant subspace on one side.

`randomized_projector` is a range finder (sketch, a few power iterations kept apart by Newton-Schulz steps,
a final Cholesky-QR), then the top directions inside the sketch from a k x k eigendecomposition: GEMMs and
tiny factorisations only, and on a GPU a single host synchronisation (the eigendecomposition's own check). `svd_projector` is the exact answer
(GaLore's choice), for comparison and for `refresh="svd"`.
"""

import torch

from .._dispatch import op

SIDES = ("left", "right")
# The float32 sketch is perturbed by this much (relative to its RMS entry) of a Gaussian matrix before its
# Cholesky-QR: far below what a gradient's dominant directions can notice, and it keeps the sketch's
# condition number near 1e7 even when the gradient has fewer than k directions (a zero gradient, or fewer
# tokens than k), so the float64 Cholesky of its Gram matrix never meets a singular matrix and needs no
# check (a check is a host synchronisation).
SKETCH_JITTER = 1e-6
# Absolute floor of the perturbation, so that an all-zero sketch still gets an orthonormal basis.
JITTER_FLOOR = 1e-30
# Between the power iteration's products the columns only need keeping apart (the span is what counts), and
# GEMMs do that far faster than a Cholesky-QR pass, whose k x k factorisation is one latency-bound kernel (H200,
# k = 520: 0.28-0.55 ms, and 0.2-0.36 ms more for the triangular solve; bench/NOTES.md). A quintic
# a x + b x^3 + c x^5 acts on every singular value of a matrix scaled to norm <= 1; these coefficients bring
# each value above ~1e-3 into [0.68, 1.13] within five steps and grow smaller ones 3.4-fold a step. Steps by
# the dtype the steps run in: eight lift every direction down to ~1e-5 of the largest out of bf16's rounding;
# float32 resolves directions ~100x weaker, which twelve lift (fewer lost accuracy on steep spectra at k = 520).
KEEP_APART_STEPS = {torch.bfloat16: 8, torch.float32: 12}
KEEP_APART_QUINTIC = (3.4445, -4.7750, 2.0315)


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _cholesky_qr(y: torch.Tensor, noise: torch.Tensor, passes: int, failures: list) -> torch.Tensor:
    """float32 columns spanning `y` (m, k), orthonormal after two passes, orthonormal enough to keep power
    iterations apart after one; float64 arithmetic, no host synchronisation. `noise`: a float64 standard
    Gaussian (m, k), the perturbation's direction. Each Cholesky's `info` (nonzero: it broke down) goes to
    `failures`, for the caller to check on the device."""
    m, k = y.shape
    y = y.to(torch.float64)
    scale = torch.linalg.vector_norm(y) * (SKETCH_JITTER / (m * k) ** 0.5) + JITTER_FLOOR
    y = torch.addcmul(y, noise, scale)
    for _ in range(passes):
        factor, info = torch.linalg.cholesky_ex(y.T @ y)
        failures.append(info)
        y = torch.linalg.solve_triangular(factor.mT, y, upper=True, left=False)
    return y.to(torch.float32)


def _orthonormal(y: torch.Tensor, noise: torch.Tensor, passes: int, failures: list) -> torch.Tensor:
    return torch.linalg.qr(y).Q if y.dtype == torch.float64 else _cholesky_qr(y, noise, passes, failures)


def keep_apart(y: torch.Tensor) -> torch.Tensor:
    """Columns with `y`'s span (m, k) whose singular values are all brought near 1 but those far below the
    largest (Newton-Schulz steps): GEMMs only, in bf16 for a bf16 `y`, else float32 (float64: Householder QR).
    Not orthonormal; what a power iteration needs between its products. Zero stays zero, a non-finite `y`
    gives NaN."""
    if y.dtype == torch.float64:
        return torch.linalg.qr(y).Q
    x = y if y.dtype == torch.bfloat16 else y.to(torch.float32)  # fp16 would overflow in the Gram
    gram = x.T @ x
    # The Gram's Frobenius norm bounds the largest squared singular value: every value of x ends at most 1.
    scale = torch.linalg.vector_norm(gram, dtype=torch.float32).clamp_min(JITTER_FLOOR).rsqrt()
    x = x * scale.to(x.dtype)
    gram = gram * (scale * scale).to(x.dtype)
    a, b, c = KEEP_APART_QUINTIC
    for step in range(KEEP_APART_STEPS[x.dtype]):
        if step:
            gram = x.T @ x
        x = torch.addmm(x, x, torch.addmm(gram, gram, gram, beta=b, alpha=c), beta=a)
    return x


def orthonormalize(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthonormal columns spanning `y` (m, k). float64: Householder QR (exact, slow on a GPU); otherwise
    Cholesky-QR twice in float64 after a perturbation of relative size SKETCH_JITTER (so the span is `y`'s
    to about that accuracy), in float32, without a host synchronisation; NaN if the Cholesky broke down."""
    if y.dtype == torch.float64:
        return torch.linalg.qr(y).Q
    if generator is None:
        generator = torch.Generator(device=y.device).manual_seed(0)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float64)
    failures: list = []
    q = _cholesky_qr(y.to(torch.float32), noise, 2, failures)
    return torch.where(torch.stack(failures).eq(0).all(), q, torch.nan)


def oriented(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose column space the projector spans, in the dtype its products run in: a 16-bit
    gradient stays 16-bit (tensor cores, no float32 copy); each product is orthonormalised before the next,
    so its rounding only blurs directions ~1e-3 below the largest, which the projector (kept in that
    dtype) could not hold anyway."""
    g = matrix if matrix.dtype in (torch.bfloat16, torch.float16) else matrix.to(
        torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    return g.T if side == "right" else g


def sketch_size(shape: tuple, rank: int, oversample: int) -> int:
    return min(rank + oversample, shape[0], shape[1])


def sketch_inputs(g: torch.Tensor, k: int, seed: int, out: tuple | None = None) -> tuple:
    """The random inputs of `sketch` for the oriented (m, n) matrix `g`: the test matrix (n, k) in g's
    dtype and the float64 perturbation directions (m, k) of the final basis, both from `seed`; written
    into `out` (two tensors of those shapes) when given."""
    return draw_sketch_inputs(g, k, torch.Generator(device=g.device).manual_seed(seed), out)


def draw_sketch_inputs(g: torch.Tensor, k: int, generator: torch.Generator, out: tuple | None = None) -> tuple:
    """`sketch_inputs` drawn from `generator` as it stands: from a generator just seeded with `seed`, the
    same draws. Capturable in a CUDA graph that the generator is registered with (reseeded before each
    replay, the replay draws that seed's inputs)."""
    m, n = g.shape
    omega = torch.randn(n, k, generator=generator, device=g.device, dtype=torch.float32)
    if out is None:
        return omega.to(g.dtype), torch.randn(m, k, generator=generator, device=g.device, dtype=torch.float64)
    out[0].copy_(omega)
    torch.randn(m, k, generator=generator, device=g.device, dtype=torch.float64, out=out[1])
    return out


def sketch_parts(power_iters: int) -> int:
    """How many parts `sketch_part` divides a sketch with `power_iters` power iterations into."""
    return power_iters + 1


def sketch_part(part: int, g: torch.Tensor, omega: torch.Tensor, noise_rows: torch.Tensor, power_iters: int,
                carry: tuple | None) -> tuple:
    """Part `part` (0 <= part < sketch_parts(power_iters)) of `sketch`, two products each: every part but the
    last ends with a power iteration's half-way basis and returns the carry the next part takes, (q, ok): q
    (n, k) from `keep_apart`, ok a 0-d bool (True: only the last part can break down); the last returns
    `sketch`'s result. Run one after another, the parts are `sketch` op for op, so a sketch may be spread over
    several steps of training. No host synchronisation."""
    failures: list = []

    def orthonormal(y: torch.Tensor, noise: torch.Tensor, passes: int) -> torch.Tensor:
        return _orthonormal(y if y.dtype == torch.float64 else y.to(torch.float32), noise, passes, failures)

    def all_ok() -> torch.Tensor:
        if not failures:  # float64: Householder QR, which does not break down
            return torch.ones((), dtype=torch.bool, device=g.device) if carry is None else carry[1]
        ok = torch.stack(failures).eq(0).all()
        return ok if carry is None else carry[1] & ok

    y = g @ omega if part == 0 else g @ carry[0].to(g.dtype)
    if part < power_iters:
        return keep_apart(g.T @ keep_apart(y).to(g.dtype)), all_ok()
    basis = orthonormal(y, noise_rows, 2)
    small = (basis.T.to(g.dtype) @ g).to(torch.float64)  # (k, n)
    gram = small @ small.T
    return basis, gram, torch.isfinite(gram).all() & all_ok()


def sketch(g: torch.Tensor, omega: torch.Tensor, noise_rows: torch.Tensor,
           power_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The range finder on the oriented matrix `g` (m, n): an orthonormal basis (m, k) of its dominant
    column space, the Gram matrix (k, k) float64 of `basis^T g` for the Rayleigh-Ritz step, and a 0-d
    bool that is False when anything broke down (a non-finite `g`, a Cholesky). No host synchronisation:
    the optimizer captures it in CUDA graphs."""
    carry = None
    for part in range(sketch_parts(power_iters)):
        carry = sketch_part(part, g, omega, noise_rows, power_iters, carry)
    return carry


def ritz_vectors(gram: torch.Tensor, healthy: torch.Tensor) -> torch.Tensor:
    """The eigenvectors (ascending eigenvalues) of the sketch's Gram matrix: the Rayleigh-Ritz step's one
    factorisation, and on a GPU the refresh's one host synchronisation (cuSOLVER checks its result)."""
    # float64: twice as fast as float32 on a GPU at k ~ 136 (cuSOLVER), and exact enough for any input.
    # A broken sketch is zeroed rather than passed on: eigh raises on NaN.
    return torch.linalg.eigh(torch.where(healthy, gram, 0.0))[1]


def ritz_projector(basis: torch.Tensor, vectors: torch.Tensor, healthy: torch.Tensor, rank: int) -> torch.Tensor:
    """The top `rank` directions inside `basis` from `ritz_vectors`, all NaN when the sketch broke down;
    no host synchronisation."""
    top = vectors.flip(1)[:, :rank].to(basis.dtype)
    return torch.where(healthy, basis @ top, torch.nan)


def rayleigh_ritz(basis: torch.Tensor, gram: torch.Tensor, healthy: torch.Tensor, rank: int) -> torch.Tensor:
    """The top `rank` directions inside `basis` (the projector), all NaN when the sketch broke down."""
    return ritz_projector(basis, ritz_vectors(gram, healthy), healthy, rank)


def ritz_candidate(basis: torch.Tensor, vectors: torch.Tensor, healthy: torch.Tensor, rank: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`ritz_projector` in `dtype`, and whether all of it is finite (a 0-d bool); capturable."""
    projector = ritz_projector(basis, vectors, healthy, rank).to(dtype)
    return projector, torch.isfinite(projector).all()


def write_ritz_projector(kept: torch.Tensor, basis: torch.Tensor, vectors: torch.Tensor, healthy: torch.Tensor,
                         rank: int, before_write: "torch.cuda.Event | None" = None) -> None:
    """`ritz_projector` written into the projector `kept` in place, unless it is not finite (a non-finite
    gradient, a broken-down sketch: `kept` stays), decided on the device: no host synchronisation. `vectors`
    may be on the host; `before_write`: a CUDA event the current stream waits for before it writes `kept`."""
    projector, finite = ritz_candidate(basis, vectors.to(basis.device, non_blocking=True), healthy, rank, kept.dtype)
    if before_write is not None:
        torch.cuda.current_stream(kept.device).wait_event(before_write)
    torch.where(finite, projector, kept, out=kept)


@op("randomized_projector")
def randomized_projector(
    matrix: torch.Tensor, rank: int, side: str, oversample: int, power_iters: int, seed: int
) -> torch.Tensor:
    """(m, rank) for side="left" (columns span the top left singular vectors), (n, rank) for "right".
    All NaN when `matrix` is not finite or an orthonormalisation broke down (without a host
    synchronisation: the caller keeps its old projector then). On a GPU its one synchronisation is the
    k x k eigendecomposition's own check."""
    _check_side(side)
    g = oriented(matrix, side)
    inputs = sketch_inputs(g, sketch_size(g.shape, rank, oversample), seed)
    return rayleigh_ritz(*sketch(g, *inputs, power_iters), rank)


@randomized_projector.custom_op.register_fake
def _(matrix, rank, side, oversample, power_iters, seed):
    rows = matrix.shape[0] if side == "left" else matrix.shape[1]
    return matrix.new_empty(rows, rank, dtype=torch.float64 if matrix.dtype == torch.float64 else torch.float32)


@op("svd_projector")
def svd_projector(matrix: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    _check_side(side)
    g = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank].T).contiguous()


@svd_projector.custom_op.register_fake
def _(matrix, rank, side):
    rows = matrix.shape[0] if side == "left" else matrix.shape[1]
    return matrix.new_empty(rows, rank, dtype=torch.float64 if matrix.dtype == torch.float64 else torch.float32)
