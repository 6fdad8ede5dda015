"""The ops: each module holds the pure-PyTorch reference and dispatches to the fastest backend here."""

from .adam_update import adam_update
from .adapter_linear import adapter_backward, adapter_weight
from .aligned_rows import aligned_rows
from .full_linear import full_backward, full_forward
from .norm_coefficients import norm_coefficients
from .project_back import project_back_update
from .project_grad import project_grad
from .projected_grad import grad_sketch, projected_grad
from .quant8 import BLOCK_SIZE, dequantize_blockwise, dynamic_map, quantize_blockwise
from .refresh import orthonormalize, randomized_projector, svd_projector
from .row_norm import adapter_row_norm, row_norm
from .segmented_adam_update import segment_layout, segmented_adam_update

__all__ = [
    "BLOCK_SIZE",
    "adam_update",
    "adapter_backward",
    "adapter_row_norm",
    "adapter_weight",
    "aligned_rows",
    "dequantize_blockwise",
    "dynamic_map",
    "full_backward",
    "full_forward",
    "grad_sketch",
    "norm_coefficients",
    "orthonormalize",
    "project_back_update",
    "project_grad",
    "projected_grad",
    "quantize_blockwise",
    "randomized_projector",
    "row_norm",
    "segment_layout",
    "segmented_adam_update",
    "svd_projector",
]
