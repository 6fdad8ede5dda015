"""8-bit block-wise quantisation against bitsandbytes' own quantize_blockwise / dequantize_blockwise."""

import pytest
import torch
from conftest import DEVICE, backend_params, backends_for, interpreted, poisoned_empty, run_op

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


# Exactness of the Triton kernels' nearest-code search: it must return torch.bucketize(scaled, midpoints)
# for every float, ties included, and every element of every block must be written.
TRITON = "triton" in backends_for("quantize_blockwise")
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton backend does not load here")
if TRITON:
    import triton
    import triton.language as tl

    from gradnormlorp_kernels.triton import quant8 as triton_quant8

    @triton.jit
    def _nearest_code_probe_kernel(
        x_ptr, out_ptr, table_ptr, midpoints_ptr, numel, base, half, CANDIDATES: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        code = triton_quant8._nearest_code(x, table_ptr, midpoints_ptr, base, half, CANDIDATES)
        tl.store(out_ptr + offsets, code, mask=mask)


def custom_maps():
    """Maps other than bitsandbytes': linear signed and unsigned, and sorted random with repeated entries."""
    repeated = torch.cat([torch.zeros(6), torch.full((4,), 0.25), torch.rand(244) * 2 - 1, torch.tensor([-1.0, 1.0])])
    return {
        "linear": torch.linspace(-1, 1, 256),
        "linear-unsigned": torch.linspace(0, 1, 256),
        "repeated": torch.sort(repeated).values,
    }


def map_by_name(name):
    if name in ("signed", "unsigned"):
        return ops.dynamic_map(name == "signed", DEVICE)
    return custom_maps()[name].to(DEVICE)


def reference_midpoints(code):
    return (code[1:] + code[:-1]) * 0.5


def not_nan(x):
    return x[~torch.isnan(x)]


def search_probes(code):
    """Every midpoint and its float neighbours, both ends of every bucket of 2^16 float32 bit patterns (the
    search's buckets are unions of these), specials, and random values and bit patterns."""
    midpoints = reference_midpoints(code).to(torch.float32)
    inf = torch.full_like(midpoints, float("inf"))
    prefixes = torch.arange(0, 0x7F81, dtype=torch.int64) << 16
    ends = torch.cat([prefixes, prefixes | 0xFFFF]).clamp(max=0x7F800000).to(torch.int32).view(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    specials = torch.tensor([0.0, 1.0, float("inf"), 2.0**-149, 2.0**-140, tiny, tiny * (1 - 2.0**-23), 1 - 2.0**-24,
                             1 + 2.0**-23, 0.5, 3.0e38])
    random = torch.randn(20000) * torch.pow(10.0, torch.empty(20000).uniform_(-44, 2))
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), dtype=torch.int32).view(torch.float32)
    values = torch.cat([
        midpoints, torch.nextafter(midpoints, inf), torch.nextafter(midpoints, -inf), code.to(torch.float32),
        ends.to(code.device), specials.to(code.device), random.to(code.device), not_nan(bits).to(code.device),
    ])
    return torch.cat([values, -values])


@needs_triton
@pytest.mark.parametrize("name", ["signed", "unsigned", "linear", "linear-unsigned", "repeated"])
def test_nearest_code_is_bucketize(name):
    code = map_by_name(name)
    search = triton_quant8.code_search(code)
    if name in ("signed", "unsigned"):
        assert search.candidates == 1, "bitsandbytes' maps should need one comparison per value"
    x = search_probes(code)
    out = torch.full(x.shape, -1, dtype=torch.int32, device=DEVICE)
    block = 8192
    _nearest_code_probe_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, search.table, search.midpoints, x.numel(), search.base, search.half,
        CANDIDATES=search.candidates, BLOCK=block,
    )
    expected = torch.bucketize(x, reference_midpoints(code))
    wrong = out.long() != expected
    assert not bool(wrong.any()), f"{int(wrong.sum())} wrong, e.g. x={x[wrong][:4].tolist()}"


def probe_blocks(numel, code):
    """Random values of very different scales per block; every other block instead holds the map's midpoints
    (and their neighbours, zeros, tiny values) under an absmax of exactly 1, so they are the scaled values."""
    midpoints = reference_midpoints(code).to(torch.float32)
    inf = torch.full_like(midpoints, float("inf"))
    tiny = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149), 1e-30, -1e-30, -1.0], device=code.device)
    on_map = torch.cat([midpoints, torch.nextafter(midpoints, inf), torch.nextafter(midpoints, -inf), tiny])
    x = torch.randn(numel, device=code.device)
    blocks = -(-numel // BLOCK)
    x *= torch.pow(10.0, torch.empty(blocks, device=code.device).uniform_(-30, 3)).repeat_interleave(BLOCK)[:numel]
    for b, start in enumerate(range(0, numel, 2 * BLOCK)):
        chunk = on_map.roll(-b * (BLOCK - 1))[: BLOCK - 1]
        block = torch.cat([torch.ones(1, device=code.device), chunk])[: min(BLOCK, numel - start)]
        x[start : start + block.numel()] = block
    return x


# Tails: one element, fewer blocks than a program takes, a partial last block, several programs.
EXACT_SIZES = [1, 255, 257, 2047, 2049, 4097, 4 * 2048 + 300]


@needs_triton
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", EXACT_SIZES)
def test_triton_quantize_is_bit_exact(numel, signed):
    code = ops.dynamic_map(signed, DEVICE)
    x = probe_blocks(numel, code)
    with poisoned_empty():
        codes, absmax = run_op(ops.quantize_blockwise, "triton", x, code)
    expected_codes, expected_absmax = ops.quantize_blockwise.reference(x, code)
    assert torch.equal(absmax, expected_absmax)
    wrong = codes != expected_codes
    assert not bool(wrong.any()), f"{int(wrong.sum())} codes differ from the reference"


@needs_triton
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", EXACT_SIZES)
def test_triton_dequantize_is_bit_exact(numel, signed):
    code = ops.dynamic_map(signed, DEVICE)
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, device=DEVICE)
    absmax = torch.rand(-(-numel // BLOCK), device=DEVICE) * 10
    with poisoned_empty():
        values = run_op(ops.dequantize_blockwise, "triton", codes, absmax, code)
    assert torch.equal(values, ops.dequantize_blockwise.reference(codes, absmax, code))


@needs_triton
def test_triton_search_follows_an_in_place_map_change():
    code = ops.dynamic_map(True).clone().to(DEVICE)
    x = probe_blocks(3 * BLOCK, code)
    run_op(ops.quantize_blockwise, "triton", x, code)
    code.mul_(0.5)  # still sorted; the cached search table must be rebuilt
    codes, absmax = run_op(ops.quantize_blockwise, "triton", x, code)
    expected_codes, expected_absmax = ops.quantize_blockwise.reference(x, code)
    assert torch.equal(codes, expected_codes) and torch.equal(absmax, expected_absmax)
