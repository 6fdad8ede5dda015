"""segmented_adam_update: every segment bit for bit an `adam_update` of its own slice, skipped on its own,
padding neither read nor written, bad input rejected before anything changes."""

import importlib

import pytest
import torch
from conftest import (
    DEVICE, assert_close_scaled, backend_params, interpreted, other_backend_params, poisoned_empty, run_op,
)

from gradnormlorp_kernels import _dispatch, ops
from gradnormlorp_kernels.ops.quant8 import num_blocks

BLOCK = ops.BLOCK_SIZE
BETAS = (0.9, 0.999)
EPS = 1e-8
STEPS = 4
# float32 bias corrections on the device: see test_adam_update's DIRECTION_RTOL.
DIRECTION_RTOL = 5e-5

# Packed by segment_layout: zero-size segments first (sharing a start with the next), inside and last.
PACKED_NUMELS = [0, 1, 15, 256, 0, 257, 4097, 0]
# By hand, with padding blocks before, between and after the segments (and a zero-size one in a gap):
# block 0 padding | 15 in block 1 | block 2 padding | 257 in blocks 3-4 | 1 in block 5 | 0 at block 6 |
# blocks 6-7 padding | 300 in blocks 8-9 | blocks 10-11 padding | 256 in block 12 | blocks 13-14 padding.
GAPPED_STARTS = [256, 768, 1280, 1536, 2048, 3072]
GAPPED_NUMELS = [15, 257, 1, 0, 300, 256]
GAPPED_TOTAL = 15 * BLOCK

# What the padding holds: the op must leave these alone, and a NaN gradient there must not skip anything.
PAD_CODE = 0x5A
PAD_ABSMAX = -7.0  # an absmax is never negative
PAD_STATE = -1234.5


def packed_layout():
    starts, numels, total = ops.segment_layout(PACKED_NUMELS, DEVICE)
    return starts, numels, total


def gapped_layout():
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=DEVICE)  # noqa: E731
    return as_tensor(GAPPED_STARTS), as_tensor(GAPPED_NUMELS), GAPPED_TOTAL


LAYOUTS = {"packed": packed_layout, "gapped": gapped_layout}


def spans(starts, numels):
    """(index, element slice, absmax block slice) of every segment."""
    for index, (start, numel) in enumerate(zip(starts.tolist(), numels.tolist())):
        yield index, slice(start, start + numel), slice(start // BLOCK, start // BLOCK + num_blocks(numel))


def inside_masks(starts, numels, total):
    """Boolean masks of the elements and of the absmax blocks that some segment holds."""
    elements = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    blocks = torch.zeros(num_blocks(total), dtype=torch.bool, device=DEVICE)
    for _, span, block_span in spans(starts, numels):
        elements[span] = True
        blocks[block_span] = True
    return elements, blocks


def maps(quantized):
    if not quantized:
        return None, None
    return ops.dynamic_map(True, DEVICE), ops.dynamic_map(False, DEVICE)


def make_state(starts, numels, total, quantized):
    """Random moments inside the segments (so the states matter), sentinels in the padding, and different
    step/skipped counts per segment (so each segment's own bias correction matters)."""
    elements, blocks = inside_masks(starts, numels, total)
    state = {}
    if quantized:
        for name in ("exp_avg", "exp_avg_sq"):
            codes = torch.randint(0, 256, (total,), dtype=torch.uint8, device=DEVICE)
            state[name] = torch.where(elements, codes, torch.full_like(codes, PAD_CODE))
        for name, size in (("absmax_avg", 1e-2), ("absmax_avg_sq", 1e-4)):
            absmax = torch.rand(num_blocks(total), device=DEVICE) * size + size / 10
            state[name] = torch.where(blocks, absmax, torch.full_like(absmax, PAD_ABSMAX))
    else:
        m = torch.randn(total, device=DEVICE) * 1e-2
        v = torch.rand(total, device=DEVICE) * 1e-4
        state["exp_avg"] = torch.where(elements, m, torch.full_like(m, PAD_STATE))
        state["exp_avg_sq"] = torch.where(elements, v, torch.full_like(v, PAD_STATE))
        state["absmax_avg"] = state["absmax_avg_sq"] = None
    segments = starts.numel()
    state["step"] = torch.randint(0, 8, (segments,), device=DEVICE).to(torch.float32)
    state["skipped"] = torch.randint(0, 3, (segments,), device=DEVICE).to(torch.float32)
    return state


def clone_state(state):
    return {name: None if value is None else value.clone() for name, value in state.items()}


def make_grad(starts, numels, total, dtype=torch.float32):
    """Gradients of a different size per segment, NaN in the padding."""
    grad = torch.full((total,), float("nan"), dtype=torch.float64, device=DEVICE)
    for _, span, _ in spans(starts, numels):
        size = 10.0 ** float(torch.randint(-3, 2, ()))
        grad[span] = torch.randn(span.stop - span.start, dtype=torch.float64, device=DEVICE) * size
    return grad.to(dtype)


def segmented(backend, grad, state, starts, numels, scale, out_dtype, betas=BETAS, eps=EPS):
    code_signed, code_unsigned = maps(state["absmax_avg"] is not None)
    return run_op(
        ops.segmented_adam_update, backend, grad, state["exp_avg"], state["exp_avg_sq"], state["absmax_avg"],
        state["absmax_avg_sq"], code_signed, code_unsigned, starts, numels, state["step"], state["skipped"],
        betas[0], betas[1], eps, scale, out_dtype,
    )


def per_segment(backend, grad, state, starts, numels, scale, out_dtype, betas=BETAS, eps=EPS, shapes=None):
    """`adam_update` (same backend) of each segment alone, on views of the flat states; the output zero
    outside the segments."""
    quantized = state["absmax_avg"] is not None
    code_signed, code_unsigned = maps(quantized)
    out = torch.zeros(grad.shape, dtype=out_dtype, device=grad.device)
    for index, span, block_span in spans(starts, numels):
        shape = (span.stop - span.start,) if shapes is None else shapes[index]
        direction = run_op(
            ops.adam_update, backend, grad[span].view(shape), state["exp_avg"][span].view(shape),
            state["exp_avg_sq"][span].view(shape), state["absmax_avg"][block_span] if quantized else None,
            state["absmax_avg_sq"][block_span] if quantized else None, code_signed, code_unsigned,
            state["step"][index], state["skipped"][index], betas[0], betas[1], eps,
        )
        assert direction.dtype == torch.float32
        out[span] = (direction * scale).to(out_dtype).reshape(-1)
    return out


_BITS = {
    torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
}


def assert_bit_equal(actual, expected, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bits = _BITS.get(actual.dtype)
    differ = actual.view(bits) != expected.view(bits) if bits else actual != expected
    if bool(differ.any()):
        first = int(differ.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {differ.numel()} elements differ, first at {first}: "
            f"{actual.reshape(-1)[first].item()!r} != {expected.reshape(-1)[first].item()!r}"
        )


def assert_states_equal(actual, expected, when):
    for name, value in expected.items():
        if value is not None:
            assert_bit_equal(actual[name], value, f"{name} {when}")


WIDEST, NARROWEST = 8, 1  # quantisation blocks a program of Triton's update takes


def set_tiles(monkeypatch, backend, blocks):
    """Triton's update tile: `blocks` quantisation blocks a program (WIDEST: tiles spanning several
    segments and the padding between them; NARROWEST: one block a program)."""
    if backend == "triton":
        module = importlib.import_module("gradnormlorp_kernels.triton.segmented_adam_update")
        monkeypatch.setattr(module, "_QUANTIZED_BLOCKS", blocks)
        monkeypatch.setattr(module, "_PLAIN_BLOCKS", blocks)


def scale_tensor(value=-0.375):
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


# ---- 1. bit for bit an adam_update of each segment ----


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_fp32", "out_bf16"])
def test_bit_exact_with_adam_update_per_segment(backend, layout, quantized, out_dtype, monkeypatch):
    starts, numels, total = LAYOUTS[layout]()
    state = make_state(starts, numels, total, quantized)
    expected = clone_state(state)
    initial_step = state["step"].clone()
    elements, _ = inside_masks(starts, numels, total)
    scale = scale_tensor()
    for t in range(1, STEPS + 1):
        set_tiles(monkeypatch, backend, WIDEST if t % 2 else NARROWEST)
        grad = make_grad(starts, numels, total)
        out = segmented(backend, grad, state, starts, numels, scale, out_dtype)
        expected_out = per_segment(backend, grad, expected, starts, numels, scale, out_dtype)
        assert out.dtype == out_dtype and out.shape == (total,)
        assert_bit_equal(out[elements], expected_out[elements], f"output at step {t}")
        assert bool(torch.isfinite(out[elements].float()).all())
        # Whole buffers, padding included (the per-segment run never touches the padding).
        assert_states_equal(state, expected, f"at step {t}")
        assert torch.equal(state["step"], initial_step + t)


def test_packed_layout_has_every_size():
    # The sizes the bit-exact test is meant to cover: one element, a partial block, a full block, one past a
    # block, 16 blocks and one element, and empty segments.
    assert {1, 15, 256, 257, 4097, 0} <= set(PACKED_NUMELS)
    starts, numels, total = gapped_layout()
    elements, blocks = inside_masks(starts, numels, total)
    assert not bool(blocks.all()) and not bool(elements.all())


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("betas,eps", [((0.3, 0.75), 1e-3), ((0.9, 0.99), 1e-6)], ids=["lerp_from_end", "lerp"])
def test_hyperparameters_are_used(backend, betas, eps):
    # Betas, eps and scale given (not defaults), both of torch.lerp's formulas: the hand-written answer, and
    # still bit for bit the per-segment adam_update.
    starts, numels, total = ops.segment_layout([1, 15, 257], DEVICE)
    state = make_state(starts, numels, total, quantized=False)
    state["step"].zero_()
    expected = clone_state(state)
    held = clone_state(state)
    grad = make_grad(starts, numels, total)
    scale = scale_tensor(2.5)
    out = segmented(backend, grad, state, starts, numels, scale, torch.float32, betas, eps)
    expected_out = per_segment(backend, grad, expected, starts, numels, scale, torch.float32, betas, eps)
    elements, _ = inside_masks(starts, numels, total)
    assert_bit_equal(out[elements], expected_out[elements], "output")
    assert_states_equal(state, expected, "after one step")
    for _, span, _ in spans(starts, numels):
        _, _, direction = hand_adam(held["exp_avg"][span], held["exp_avg_sq"][span], grad[span], 1, *betas, eps)
        assert_close_scaled(out[span], 2.5 * direction, DIRECTION_RTOL, f"output of {span}")


# ---- 2. a non-finite gradient skips its segment only ----

# (bad value, segment index in the gapped layout, element of that segment)
NON_FINITE_CASES = [
    pytest.param(float("nan"), 4, 299, id="nan-in-last-partial-block"),
    pytest.param(float("inf"), 2, 0, id="inf-in-one-element-segment"),
    pytest.param(float("-inf"), 1, 3, id="-inf-in-first-block"),
]


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("bad,bad_segment,bad_element", NON_FINITE_CASES)
def test_non_finite_gradient_skips_only_its_segment(backend, quantized, bad, bad_segment, bad_element, monkeypatch):
    if interpreted(backend) and bad == float("-inf"):
        pytest.skip("slow under TRITON_INTERPRET; nan and +inf cover it, the GPU run covers -inf")
    set_tiles(monkeypatch, backend, WIDEST)  # the bad segment shares its tiles with finite ones
    starts, numels, total = gapped_layout()
    state = make_state(starts, numels, total, quantized)
    expected = clone_state(state)
    before = clone_state(state)
    _, span, block_span = list(spans(starts, numels))[bad_segment]
    others = torch.arange(starts.numel(), device=DEVICE) != bad_segment
    scale = scale_tensor()

    grad = make_grad(starts, numels, total)
    grad[span.start + bad_element] = bad
    out = segmented(backend, grad, state, starts, numels, scale, torch.float32)

    assert torch.equal(out[span], torch.zeros_like(out[span])), "a skipped segment's output must be zero"
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[name][span], before[name][span]), f"{name} of the skipped segment changed"
    if quantized:
        for name in ("absmax_avg", "absmax_avg_sq"):
            assert torch.equal(state[name][block_span], before[name][block_span]), f"{name} of the skipped segment"
    assert state["step"][bad_segment] == before["step"][bad_segment]
    assert state["skipped"][bad_segment] == before["skipped"][bad_segment] + 1
    assert torch.equal(state["step"][others], before["step"][others] + 1)
    assert torch.equal(state["skipped"][others], before["skipped"][others])
    # The others advance exactly as adam_update of each alone (which also skips the bad one).
    expected_out = per_segment(backend, grad, expected, starts, numels, scale, torch.float32)
    elements, _ = inside_masks(starts, numels, total)
    assert_bit_equal(out[elements], expected_out[elements], "output on the skipped step")
    assert_states_equal(state, expected, "after the skipped step")
    for index, other, _ in spans(starts, numels):
        if index != bad_segment and other.stop > other.start:
            assert bool(out[other].ne(0).any()), f"segment {index} skipped with the bad one"

    # The next finite step carries on from the untouched state, counted as that segment's next step.
    grad = make_grad(starts, numels, total)
    out = segmented(backend, grad, state, starts, numels, scale, torch.float32)
    expected_out = per_segment(backend, grad, expected, starts, numels, scale, torch.float32)
    assert_bit_equal(out[elements], expected_out[elements], "output after the skipped step")
    assert_states_equal(state, expected, "after the next step")
    assert state["step"][bad_segment] == before["step"][bad_segment] + 1
    assert bool(out[span].ne(0).any())


# ---- 3. padding never written, every segment element written ----


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out_fp32", "out_bf16"])
@pytest.mark.parametrize("tile_blocks", [WIDEST, NARROWEST], ids=["widest", "narrowest"])
def test_padding_untouched_and_segments_written(backend, quantized, out_dtype, tile_blocks, monkeypatch):
    set_tiles(monkeypatch, backend, tile_blocks)
    starts, numels, total = gapped_layout()
    state = make_state(starts, numels, total, quantized)
    before = clone_state(state)
    elements, blocks = inside_masks(starts, numels, total)
    grad = make_grad(starts, numels, total)  # NaN in the padding: it must not be read
    grad[GAPPED_STARTS[1] + 100] = float("nan")  # one segment skipped: its zero output must be written too
    grad_before = grad.clone()
    with poisoned_empty():
        out = segmented(backend, grad, state, starts, numels, scale_tensor(), out_dtype)

    assert bool(torch.isfinite(out[elements].float()).all()), "an element inside a segment was left unwritten"
    assert torch.equal(out[GAPPED_STARTS[1]:GAPPED_STARTS[1] + GAPPED_NUMELS[1]].float(),
                       torch.zeros(GAPPED_NUMELS[1], device=DEVICE))
    for name in ("exp_avg", "exp_avg_sq"):
        padding = state[name][~elements]
        assert torch.equal(padding, before[name][~elements]), f"{name} written in the padding"
        assert bool((padding == (PAD_CODE if quantized else PAD_STATE)).all())
    if quantized:
        for name in ("absmax_avg", "absmax_avg_sq"):
            assert bool((state[name][~blocks] == PAD_ABSMAX).all()), f"{name} written in a padding block"
    assert torch.equal(grad.isnan(), grad_before.isnan()) and torch.equal(grad.nan_to_num(), grad_before.nan_to_num())
    # Only the segment with the NaN inside it was skipped (the NaNs in the padding count for nothing).
    skipped = torch.zeros(starts.numel(), device=DEVICE)
    skipped[1] = 1
    assert torch.equal(state["skipped"], before["skipped"] + skipped)
    assert torch.equal(state["step"], before["step"] + 1 - skipped)


# ---- 4. float64 takes the reference path: against a hand-written float64 Adam ----


def hand_adam(m, v, g, t, beta1=BETAS[0], beta2=BETAS[1], eps=EPS):
    """One Adam step in float64: new moments and the bias-corrected direction."""
    g = g.to(torch.float64)
    m = beta1 * m.to(torch.float64) + (1 - beta1) * g
    v = beta2 * v.to(torch.float64) + (1 - beta2) * g * g
    direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return m, v, direction



@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize(
    "state_dtype",
    [torch.float32, torch.float64],
    ids=["fp32_states", "fp64_states"],
)
def test_float64_matches_hand_written_adam(backend, state_dtype):
    starts, numels, total = gapped_layout()
    m = torch.zeros(total, dtype=torch.float64, device=DEVICE)
    v = torch.zeros_like(m)
    m_size = torch.zeros_like(m)  # the first moment of |g|: the size of the terms m sums, which may cancel
    state = {"exp_avg": m.to(state_dtype, copy=True), "exp_avg_sq": v.to(state_dtype, copy=True), "absmax_avg": None,
             "absmax_avg_sq": None}
    segments = starts.numel()
    state["step"] = torch.zeros(segments, device=DEVICE)
    state["skipped"] = torch.zeros(segments, device=DEVICE)
    elements, _ = inside_masks(starts, numels, total)
    scale = scale_tensor(0.5)
    for t in range(1, 6):
        grad = make_grad(starts, numels, total, torch.float64)
        out = segmented(backend, grad, state, starts, numels, scale, torch.float64)
        m, v, direction = hand_adam(m, v, torch.where(elements, grad, 0.0), t)
        m_size, _, _ = hand_adam(m_size, torch.zeros_like(m), torch.where(elements, grad, 0.0).abs(), t)
        assert out.dtype == torch.float64 and out.shape == (total,)
        assert state["exp_avg"].dtype == state_dtype
        assert_close_scaled(out[elements], 0.5 * direction[elements], DIRECTION_RTOL, f"output at step {t}")
        m_error = (state["exp_avg"][elements].to(torch.float64) - m[elements]).abs()
        assert bool((m_error <= 1e-6 * m_size[elements]).all()), f"exp_avg at step {t}"
        assert_close_scaled(state["exp_avg_sq"][elements], v[elements], 1e-6, f"exp_avg_sq at step {t}")
        assert torch.equal(state["step"], torch.full_like(state["step"], t))
        assert not bool(state["skipped"].any())


# ---- 5. bad input: ValueError naming the argument, nothing changed ----


def valid_args(quantized=True):
    """The op's arguments by name for the gapped layout."""
    starts, numels, total = gapped_layout()
    state = make_state(starts, numels, total, quantized)
    code_signed, code_unsigned = maps(quantized)
    return {
        "grad": make_grad(starts, numels, total), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
        "absmax_avg": state["absmax_avg"], "absmax_avg_sq": state["absmax_avg_sq"], "code_signed": code_signed,
        "code_unsigned": code_unsigned, "starts": starts, "numels": numels, "step": state["step"],
        "skipped": state["skipped"], "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "scale": scale_tensor(),
        "out_dtype": torch.float32,
    }


def with_start(index, value):
    def change(args):
        starts = args["starts"].clone()
        starts[index] = value
        return {"starts": starts}
    return change


def with_numel(index, value):
    def change(args):
        numels = args["numels"].clone()
        numels[index] = value
        return {"numels": numels}
    return change


def strided_like(tensor):
    """Same shape and values, not contiguous."""
    wide = torch.stack([tensor, tensor], dim=-1)
    return wide[..., 0]


# (id, changed arguments, what the message names)
BAD_INPUTS = [
    ("grad_2d", lambda a: {"grad": a["grad"].view(1, -1)}, r"\bgrad\b"),
    ("exp_avg_shape", lambda a: {"exp_avg": a["exp_avg"][:-1]}, r"\bexp_avg\b"),
    ("exp_avg_sq_shape", lambda a: {"exp_avg_sq": torch.cat([a["exp_avg_sq"], a["exp_avg_sq"][:1]])}, "exp_avg_sq"),
    ("exp_avg_2d", lambda a: {"exp_avg": a["exp_avg"].view(-1, BLOCK)}, r"\bexp_avg\b"),
    ("exp_avg_not_contiguous", lambda a: {"exp_avg": strided_like(a["exp_avg"])}, r"\bexp_avg\b"),
    ("only_absmax_avg", lambda a: {"absmax_avg_sq": None}, "absmax_avg"),
    ("only_absmax_avg_sq", lambda a: {"absmax_avg": None}, "absmax_avg"),
    ("absmax_avg_short", lambda a: {"absmax_avg": a["absmax_avg"][:-1]}, r"\babsmax_avg\b"),
    ("absmax_avg_sq_long", lambda a: {"absmax_avg_sq": torch.cat([a["absmax_avg_sq"]] * 2)}, "absmax_avg_sq"),
    ("absmax_avg_float64", lambda a: {"absmax_avg": a["absmax_avg"].double()}, r"\babsmax_avg\b"),
    ("step_short", lambda a: {"step": a["step"][:-1]}, r"\bstep\b"),
    ("step_0d", lambda a: {"step": a["step"][0]}, r"\bstep\b"),
    ("step_int64", lambda a: {"step": a["step"].long()}, r"\bstep\b"),
    ("skipped_long", lambda a: {"skipped": torch.cat([a["skipped"], a["skipped"][:1]])}, r"\bskipped\b"),
    ("skipped_float64", lambda a: {"skipped": a["skipped"].double()}, r"\bskipped\b"),
    ("scale_1d", lambda a: {"scale": a["scale"].view(1)}, r"\bscale\b"),
    ("scale_float64", lambda a: {"scale": a["scale"].double()}, r"\bscale\b"),
    ("start_not_aligned", with_start(1, GAPPED_STARTS[1] + 1), r"segment 1\b"),
    ("start_half_block", with_start(0, BLOCK // 2), r"segment 0\b"),
    ("overlapping", with_start(2, GAPPED_STARTS[1] + BLOCK), r"segment 2\b"),  # 257 elements reach block 4
    ("descending", with_start(5, GAPPED_STARTS[0]), r"segment 5\b"),
    ("past_the_end", with_numel(5, GAPPED_TOTAL - GAPPED_STARTS[5] + 1), r"segment 5\b"),
    ("start_past_the_end", with_start(5, GAPPED_TOTAL + BLOCK), r"segment 5\b"),
    ("negative_numel", with_numel(3, -1), r"segment 3\b"),
    ("numels_shorter", lambda a: {"numels": a["numels"][:-1]}, r"\bnumels\b"),
    ("starts_int32", lambda a: {"starts": a["starts"].int()}, r"\bstarts\b"),
    ("numels_int32", lambda a: {"numels": a["numels"].int()}, r"\bnumels\b"),
    ("starts_2d", lambda a: {"starts": a["starts"].view(-1, 1), "numels": a["numels"].view(-1, 1),
                             "step": a["step"].view(-1, 1), "skipped": a["skipped"].view(-1, 1)}, r"\bstarts\b"),
]


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("change,names", [pytest.param(c, n, id=i) for i, c, n in BAD_INPUTS])
def test_bad_input_raises_and_changes_nothing(backend, change, names):
    args = valid_args()
    args.update(change(args))
    before = {name: value.clone() for name, value in args.items() if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match=names):
        run_op(ops.segmented_adam_update, backend, *args.values())
    for name, value in before.items():
        assert_bit_equal(args[name], value, f"{name} after a rejected call")


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
def test_valid_args_are_accepted(backend):
    # The base of the bad-input cases is itself fine (so each case fails for its own change).
    args = valid_args()
    step = args["step"].clone()
    run_op(ops.segmented_adam_update, backend, *args.values())
    assert torch.equal(args["step"], step + 1)


def test_segment_layout():
    starts, numels, total = ops.segment_layout([0, 1, 256, 257, 15, 0])
    assert starts.dtype == numels.dtype == torch.int64
    assert starts.tolist() == [0, 0, 256, 512, 1024, 1280]
    assert numels.tolist() == [0, 1, 256, 257, 15, 0]
    assert total == 1280
    empty_starts, empty_numels, empty_total = ops.segment_layout([])
    assert empty_starts.shape == empty_numels.shape == (0,) and empty_total == 0
    starts, numels, _ = ops.segment_layout([3, 4], DEVICE)
    assert starts.device.type == numels.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("bad", [-1, 2.0, True, None, "3", torch.tensor(3)], ids=repr)
def test_segment_layout_rejects_bad_numels(bad):
    with pytest.raises(ValueError, match="numels"):
        ops.segment_layout([5, bad])


# ---- 6. opcheck ----


def opcheck_args(quantized):
    # Segments covering the whole buffer (the output outside the segments is undefined, and opcheck
    # compares whole outputs): an empty segment, a full block, a full block and 45 elements.
    starts = torch.tensor([0, 0, 256, 512], dtype=torch.int64, device=DEVICE)
    numels = torch.tensor([0, 256, 256, 45], dtype=torch.int64, device=DEVICE)
    total = 557
    state = make_state(starts, numels, total, quantized)
    code_signed, code_unsigned = maps(quantized)
    return (
        torch.randn(total, device=DEVICE), state["exp_avg"], state["exp_avg_sq"], state["absmax_avg"],
        state["absmax_avg_sq"], code_signed, code_unsigned, starts, numels, state["step"], state["skipped"],
        BETAS[0], BETAS[1], EPS, scale_tensor(), torch.bfloat16,
    )


@pytest.mark.parametrize("backend", backend_params("segmented_adam_update"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
def test_opcheck(backend, quantized):
    with _dispatch.use_backend(backend):
        torch.library.opcheck(ops.segmented_adam_update.custom_op, opcheck_args(quantized))


# ---- edge cases: an empty buffer, strided small tensors ----


@pytest.mark.parametrize(
    "backend",
    backend_params("segmented_adam_update"),
)
def test_empty_segments_of_an_empty_buffer_count_a_step(backend):
    starts, numels, total = ops.segment_layout([0, 0], DEVICE)
    assert total == 0
    state = make_state(starts, numels, total, quantized=False)
    expected = clone_state(state)
    scale = scale_tensor()
    grad = torch.zeros(0, device=DEVICE)
    out = segmented(backend, grad, state, starts, numels, scale, torch.float32)
    per_segment(backend, grad, expected, starts, numels, scale, torch.float32)
    assert out.shape == (0,)
    assert torch.equal(state["step"], expected["step"]) and torch.equal(state["skipped"], expected["skipped"])



@pytest.mark.parametrize(
    "backend",
    backend_params("segmented_adam_update"),
)
@pytest.mark.parametrize("name", ["step", "skipped", "absmax_avg", "starts"])
def test_strided_small_tensors_are_handled_or_rejected(backend, name):
    # A strided (non-contiguous) view of one of the small tensors: either rejected with a ValueError naming
    # it, or updated exactly as its contiguous copy would be.
    args = valid_args()
    args["grad"][GAPPED_STARTS[4] + 7] = float("nan")  # one segment skipped, so `skipped` changes too
    contiguous = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    args[name] = strided_like(args[name])
    expected_out = run_op(ops.segmented_adam_update, backend, *contiguous.values())
    try:
        out = run_op(ops.segmented_adam_update, backend, *args.values())
    except ValueError as error:
        assert name in str(error)
        return
    elements, _ = inside_masks(contiguous["starts"], contiguous["numels"], contiguous["grad"].numel())
    assert_bit_equal(out[elements], expected_out[elements], "output")
    for key, value in contiguous.items():
        if isinstance(value, torch.Tensor):
            assert_bit_equal(args[key], value, f"{key} against the contiguous run")


# ---- 7. the GPU at LLaMA-like projected sizes ----

LLAMA_PROJECTED = [(128, 2048)] * 4 + [(128, 5461)] * 3  # q, k, v, o; gate, up, down at rank 128


@pytest.mark.gpu
@pytest.mark.parametrize("backend", other_backend_params("segmented_adam_update", "cuda"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
def test_gpu_llama_sizes_bit_exact(backend, quantized):
    shapes = LLAMA_PROJECTED * 4  # 28 segments
    starts, numels, total = ops.segment_layout([rows * cols for rows, cols in shapes], DEVICE)
    assert starts.numel() == 28
    state = make_state(starts, numels, total, quantized)
    state["step"].zero_()
    state["skipped"].zero_()
    expected = clone_state(state)
    elements, _ = inside_masks(starts, numels, total)
    scale = scale_tensor(-1e-3)
    for t in range(1, 4):
        grad = make_grad(starts, numels, total, torch.bfloat16)
        if t == 2:
            _, span, _ = list(spans(starts, numels))[13]
            grad[span.start + 12345] = float("inf")
        out = segmented(backend, grad, state, starts, numels, scale, torch.bfloat16)
        expected_out = per_segment(backend, grad, expected, starts, numels, scale, torch.bfloat16, shapes=shapes)
        torch.cuda.synchronize()
        assert_bit_equal(out[elements], expected_out[elements], f"output at step {t}")
        assert_states_equal(state, expected, f"at step {t}")
        assert float(state["skipped"].sum()) == (1.0 if t >= 2 else 0.0)
        assert float(state["step"].sum()) == 28 * t - (1 if t >= 2 else 0)
