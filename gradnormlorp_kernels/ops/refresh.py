"""Subspace refresh: an orthonormal basis of the gradient's dominant subspace on one side.

`randomized_projector` is a range finder (sketch, a few power iterations, Cholesky-QR), then the top
directions inside the sketch from a k x k eigendecomposition: GEMMs and tiny factorisations only.
`svd_projector` is the exact answer (GaLore's choice), for comparison and for `refresh="svd"`.
"""

import torch

from .._dispatch import op

SIDES = ("left", "right")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning `y` (m, k): Cholesky-QR twice, Householder QR if y is rank-deficient."""
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(y.T @ y)
        if int(info) != 0:  # a refresh-time sync: rank-deficient sketch (e.g. an all-zero gradient)
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(factor.mT, y, upper=True, left=False)
    return y


@op("randomized_projector")
def randomized_projector(
    matrix: torch.Tensor, rank: int, side: str, oversample: int, power_iters: int, seed: int
) -> torch.Tensor:
    """(m, rank) for side="left" (columns span the top left singular vectors), (n, rank) for "right"."""
    _check_side(side)
    g = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    if side == "right":
        g = g.T
    m, n = g.shape
    k = min(rank + oversample, m, n)
    generator = torch.Generator(device=g.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=generator, device=g.device, dtype=g.dtype)
    y = g @ omega
    for _ in range(power_iters):
        y = g @ orthonormalize(g.T @ orthonormalize(y))
    basis = orthonormalize(y)
    small = basis.T @ g  # (k, n)
    _, vectors = torch.linalg.eigh(small @ small.T)  # ascending eigenvalues
    top = vectors.flip(1)[:, :rank]
    return (basis @ top).contiguous()


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
