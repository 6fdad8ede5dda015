"""8-bit block-wise quantisation with bitsandbytes' dynamic maps: block 256, one float32 absmax per block.

Codes are indices into bitsandbytes' own maps (`create_dynamic_map`), nearest value wins, so our states
read the same as bitsandbytes' `quantize_blockwise` would write them.
"""

import functools

import torch

from .._dispatch import op, register_backend

BLOCK_SIZE = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    try:
        from bitsandbytes.functional import create_dynamic_map
    except ImportError as exc:  # the maps are bitsandbytes', not ours to re-derive
        raise ImportError(
            "8-bit optimizer states need bitsandbytes for its quantisation maps: pip install bitsandbytes "
            "(or use state_bits=32)"
        ) from exc
    code = create_dynamic_map(signed=signed).to(torch.float32)
    if not bool((code[1:] >= code[:-1]).all()):
        raise RuntimeError("bitsandbytes' dynamic map is expected to be sorted")
    return code


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry map: signed for the first moment, unsigned for the second (do not modify it).

    One copy per device, made once: a fresh host-to-device copy every optimizer step would wait on the GPU.
    """
    return _dynamic_map_on(bool(signed), str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _dynamic_map_on(signed: bool, device: str) -> torch.Tensor:
    return _dynamic_map_cpu(signed).to(device)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


@op("quantize_blockwise")
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(codes uint8 shaped like x, absmax float32 (blocks,))`; each value maps to its nearest code."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK_SIZE - n)).view(-1, BLOCK_SIZE)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (padded * inverse[:, None]).clamp(-1.0, 1.0).reshape(-1)[:n]
    midpoints = (code[1:] + code[:-1]) * 0.5
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.view(x.shape), absmax


@quantize_blockwise.custom_op.register_fake
def _(x, code):
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(num_blocks(x.numel()), dtype=torch.float32)


@op("dequantize_blockwise")
def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """float32 values shaped like `codes`."""
    flat = code[codes.reshape(-1).long()]
    n = flat.numel()
    scale = absmax.repeat_interleave(BLOCK_SIZE)[:n]
    return (flat * scale).view(codes.shape)


@dequantize_blockwise.custom_op.register_fake
def _(codes, absmax, code):
    return torch.empty_like(codes, dtype=torch.float32)


register_backend("quantize_blockwise", "triton", "gradnormlorp_kernels.triton.quant8", "quantize_blockwise")
register_backend("dequantize_blockwise", "triton", "gradnormlorp_kernels.triton.quant8", "dequantize_blockwise")
