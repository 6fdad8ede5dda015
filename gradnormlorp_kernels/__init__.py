"""GradNormLoRP (arXiv 2412.19616): weight-normalised low-rank adaptation with projected 8-bit Adam."""

from . import ops
from ._backends import backends
from ._dispatch import use_backend
from .layer import GradNormLoRPLinear
from .optimizer import GradNormLoRPAdamW
from .wrap import merge, wrap

__version__ = "0.1.0"

__all__ = [
    "GradNormLoRPAdamW",
    "GradNormLoRPLinear",
    "backends",
    "merge",
    "ops",
    "use_backend",
    "wrap",
]
