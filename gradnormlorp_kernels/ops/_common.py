"""Small helpers shared by the reference ops."""

import torch

# Row norms are clamped here: a zero row would otherwise make M / n a 0 / 0.
NORM_FLOOR = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the exactness tests); everything narrower accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
