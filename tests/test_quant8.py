"""8-bit block-wise quantisation against bitsandbytes' own quantize_blockwise / dequantize_blockwise."""

import pytest
import torch
from conftest import DEVICE, backend_params, interpreted, run_op

from gradnormlorp_kernels import ops

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SIZES = [1, 255, 256, 257, 4097, 70001, pytest.param(2**24 + 3, marks=pytest.mark.gpu)]
BLOCK = ops.BLOCK_SIZE
# bitsandbytes' native CPU kernel finds the code with an approximate search that resolves x / absmax only to
# about 2**-15 (measured: it picks a code up to 3.0e-5 farther than the nearest, on ~0.2% of normal data,
# far more where the map is dense near zero). Its pure-PyTorch kernel picks the nearest code, as ours does.
# So codes must be the nearest (checked exactly) and may differ from bitsandbytes' only by near-ties.
NEAR_TIE = 2.0**-14
MAX_MISMATCH_FRACTION = 0.01


def sample(numel, signed):
    x = torch.randn(numel, device=DEVICE)
    x = x if signed else x.abs()
    return x.view(17, 241) if numel == 17 * 241 else x


def nearest_distance(scaled, code):
    """Distance of each scaled value to its nearest entry of the sorted map, in float64."""
    code = code.to(torch.float64)
    upper = torch.searchsorted(code, scaled).clamp(max=code.numel() - 1)
    lower = (upper - 1).clamp(min=0)
    return torch.minimum((scaled - code[upper]).abs(), (scaled - code[lower]).abs())


def scaled_values(x, absmax):
    flat = x.reshape(-1).to(torch.float64)
    scale = absmax.to(torch.float64).repeat_interleave(BLOCK)[: flat.numel()]
    return torch.where(scale > 0, flat / scale, torch.zeros_like(flat)), scale


def assert_nearest_codes(x, codes, absmax, code):
    """Each code is a nearest map entry to x / absmax (within float32 rounding of the scaling)."""
    scaled, _ = scaled_values(x, absmax)
    chosen = (scaled - code.to(torch.float64)[codes.reshape(-1).long()]).abs()
    excess = (chosen - nearest_distance(scaled, code)).max().item()
    assert excess <= 4 * torch.finfo(torch.float32).eps, f"a code is {excess:.2e} farther than the nearest"


@pytest.mark.parametrize("backend", backend_params("quantize_blockwise"))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", SIZES)
def test_quantize_matches_bitsandbytes(backend, numel, signed):
    if numel > 5000 and interpreted(backend):
        pytest.skip("too slow under TRITON_INTERPRET; 4097 covers full and partial blocks, the GPU run covers this")
    code = ops.dynamic_map(signed, DEVICE)
    x = sample(numel, signed)
    codes, absmax = run_op(ops.quantize_blockwise, backend, x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-numel // BLOCK),)

    theirs, state = bnb_functional.quantize_blockwise(x, code=code, blocksize=BLOCK)
    assert torch.equal(absmax, state.absmax)
    assert_nearest_codes(x, codes, absmax, code)
    mismatched = (codes != theirs).reshape(-1)
    assert mismatched.float().mean().item() <= MAX_MISMATCH_FRACTION
    if mismatched.any():
        scaled, _ = scaled_values(x, absmax)
        scaled = scaled[mismatched]
        ours_code = code.to(torch.float64)[codes.reshape(-1)[mismatched].long()]
        their_code = code.to(torch.float64)[theirs.reshape(-1)[mismatched].long()]
        advantage = (scaled - their_code).abs() - (scaled - ours_code).abs()
        assert advantage.max().item() <= NEAR_TIE, "a code differs from bitsandbytes' by more than a near-tie"


@pytest.mark.parametrize("backend", backend_params("dequantize_blockwise"))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", SIZES)
def test_dequantize_matches_bitsandbytes(backend, numel, signed):
    if numel > 5000 and interpreted(backend):
        pytest.skip("too slow under TRITON_INTERPRET; 4097 covers full and partial blocks, the GPU run covers this")
    code = ops.dynamic_map(signed, DEVICE)
    x = sample(numel, signed)
    # Every code value occurs, not only the ones random data hits.
    codes = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=DEVICE)
    absmax = torch.rand(-(-numel // BLOCK), device=DEVICE) * 10
    values = run_op(ops.dequantize_blockwise, backend, codes, absmax, code)
    assert values.dtype == torch.float32 and values.shape == x.shape
    theirs = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK)
    assert torch.equal(values, theirs)


@pytest.mark.parametrize("quantize_backend", backend_params("quantize_blockwise"))
@pytest.mark.parametrize("dequantize_backend", backend_params("dequantize_blockwise"))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_round_trip_error_within_map_spacing(quantize_backend, dequantize_backend, signed):
    code = ops.dynamic_map(signed, DEVICE)
    # Blocks of very different scales, so the per-block absmax matters.
    x = sample(4097, signed).reshape(-1) * torch.logspace(-3, 3, 4097, device=DEVICE)
    codes, absmax = run_op(ops.quantize_blockwise, quantize_backend, x, code)
    values = run_op(ops.dequantize_blockwise, dequantize_backend, codes, absmax, code)
    scaled, scale = scaled_values(x, absmax)
    bound = nearest_distance(scaled, code) * scale + 4 * torch.finfo(torch.float32).eps * x.abs().to(torch.float64)
    assert bool(((values.to(torch.float64) - x.to(torch.float64)).abs() <= bound).all())
    # The map's spacing is fine enough that this bound means something: relative error per block small.
    assert (values - x).abs().max().item() <= 0.02 * absmax.max().item()


@pytest.mark.parametrize("backend", backend_params("quantize_blockwise"))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_all_zero_block(backend, signed):
    code = ops.dynamic_map(signed, DEVICE)
    x = sample(3 * BLOCK + 5, signed)
    x[BLOCK : 2 * BLOCK] = 0.0
    codes, absmax = run_op(ops.quantize_blockwise, backend, x, code)
    assert absmax[1].item() == 0.0
    zero_code = int(torch.argmin(code.abs()))
    assert bool((codes[BLOCK : 2 * BLOCK] == zero_code).all())
    # The other blocks are quantised exactly as on their own.
    alone, alone_absmax = run_op(ops.quantize_blockwise, backend, x[:BLOCK].clone(), code)
    assert torch.equal(codes[:BLOCK], alone) and torch.equal(absmax[:1], alone_absmax)
    values = ops.dequantize_blockwise(codes, absmax, code)
    assert bool(torch.isfinite(values).all())
    assert bool((values[BLOCK : 2 * BLOCK] == 0).all())


def test_dynamic_maps_are_bitsandbytes():
    for signed in (True, False):
        ours = ops.dynamic_map(signed)
        assert ours.shape == (256,) and ours.dtype == torch.float32
        assert torch.equal(ours, bnb_functional.create_dynamic_map(signed=signed).to(torch.float32))
        assert bool((ours[1:] >= ours[:-1]).all())
        assert ours.max().item() == 1.0 and bool((ours == 0).any())
    assert ops.dynamic_map(False).min().item() == 0.0
