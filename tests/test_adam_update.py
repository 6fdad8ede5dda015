"""adam_update: float32 and 8-bit states against a hand-written Adam; non-finite gradients are skipped."""

import pytest
import torch
from conftest import (
    DEVICE, assert_close_scaled, backend_params, interpreted, other_backend_params, poisoned_empty, run_op,
)

from gradnormlorp_kernels import ops

BETAS = (0.9, 0.999)
EPS = 1e-8
STEPS = 5
# The bias corrections 1 - beta**t are float32 on the device (no host sync): 1 - 0.999**t carries a relative
# error of ~1e-5 from beta2's float32 rounding alone, which the direction inherits.
DIRECTION_RTOL = 5e-5
SHAPES = [(1, 1), (5, 3), (17, 241)]  # 1, 15 and 4097 elements (16 full blocks and one partial)


def hand_adam(m, v, g, t, beta1=BETAS[0], beta2=BETAS[1], eps=EPS):
    """One Adam step in float64: new moments and the bias-corrected direction."""
    g = g.to(torch.float64)
    m = beta1 * m.to(torch.float64) + (1 - beta1) * g
    v = beta2 * v.to(torch.float64) + (1 - beta2) * g * g
    direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return m, v, direction


def counters():
    zero = torch.zeros((), dtype=torch.float32, device=DEVICE)
    return zero.clone(), zero.clone()


def float32_state(shape):
    zeros = torch.zeros(shape, dtype=torch.float32, device=DEVICE)
    return {"exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone(), "absmax_avg": None, "absmax_avg_sq": None}


def quantized_state(shape):
    """Zero moments as the optimizer creates them: the code of 0.0 in each map, absmax 0."""
    blocks = -(-torch.Size(shape).numel() // ops.BLOCK_SIZE)
    state = {}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        zero_code = int(torch.argmin(ops.dynamic_map(signed).abs()))
        state[name] = torch.full(shape, zero_code, dtype=torch.uint8, device=DEVICE)
        state[f"absmax_{name[4:]}"] = torch.zeros(blocks, dtype=torch.float32, device=DEVICE)
    return state


def maps(quantized):
    if not quantized:
        return None, None
    return ops.dynamic_map(True, DEVICE), ops.dynamic_map(False, DEVICE)


def step(backend, grad, state, step_count, skipped, quantized):
    code_signed, code_unsigned = maps(quantized)
    return run_op(
        ops.adam_update, backend, grad, state["exp_avg"], state["exp_avg_sq"], state["absmax_avg"],
        state["absmax_avg_sq"], code_signed, code_unsigned, step_count, skipped, BETAS[0], BETAS[1], EPS,
    )


def moments(state, quantized):
    """The moments the state holds, as float32 values."""
    if not quantized:
        return state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    code_signed, code_unsigned = maps(True)
    return (
        ops.dequantize_blockwise.reference(state["exp_avg"], state["absmax_avg"], code_signed),
        ops.dequantize_blockwise.reference(state["exp_avg_sq"], state["absmax_avg_sq"], code_unsigned),
    )


def assert_quantized_holds(codes, absmax, value, code):
    """`codes`/`absmax` hold `value` (float64) as well as 8 bits can: absmax is the block max, codes nearest."""
    flat = value.reshape(-1)
    blocks = -(-flat.numel() // ops.BLOCK_SIZE)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * ops.BLOCK_SIZE - flat.numel()))
    assert_close_scaled(absmax, padded.view(blocks, -1).amax(1), 1e-6, "absmax")
    scale = absmax.to(torch.float64).repeat_interleave(ops.BLOCK_SIZE)[: flat.numel()]
    scaled = torch.where(scale > 0, flat / scale, torch.zeros_like(flat))
    code64 = code.to(torch.float64)
    upper = torch.searchsorted(code64, scaled).clamp(max=255)
    nearest = torch.minimum((scaled - code64[upper]).abs(), (scaled - code64[(upper - 1).clamp(min=0)]).abs())
    chosen = (scaled - code64[codes.reshape(-1).long()]).abs()
    # Slack: the op rounds its float32 moments, this test holds them in float64.
    assert (chosen - nearest).max().item() <= 1e-6


@pytest.mark.parametrize("backend", backend_params("adam_update"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_states_match_hand_written_adam(backend, shape):
    state = float32_state(shape)
    step_count, skipped = counters()
    m = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    v = torch.zeros_like(m)
    m_size = torch.zeros_like(m)  # the first moment of |g|: the size of the terms m sums, which may cancel
    for t in range(1, STEPS + 1):
        grad = torch.randn(shape, device=DEVICE) * 10.0 ** float(torch.randint(-3, 2, ()))
        direction = step(backend, grad, state, step_count, skipped, quantized=False)
        m, v, expected = hand_adam(m, v, grad, t)
        m_size, _, _ = hand_adam(m_size, torch.zeros_like(m), grad.abs(), t)
        assert direction.dtype == torch.float32 and direction.shape == shape
        assert_close_scaled(direction, expected, DIRECTION_RTOL, f"direction at step {t}")
        # float32 rounding of each term, relative to the terms (|m| alone can be far smaller after cancellation)
        m_error = (state["exp_avg"].to(torch.float64) - m).abs()
        assert bool((m_error <= 1e-6 * m_size).all()), f"exp_avg at step {t}: {float((m_error / m_size).max()):.2e}"
        assert_close_scaled(state["exp_avg_sq"], v, 1e-6, f"exp_avg_sq at step {t}")
        assert step_count.item() == t and skipped.item() == 0


@pytest.mark.parametrize("backend", backend_params("adam_update"))
@pytest.mark.parametrize(
    "shape", [(1, 1), (17, 241), pytest.param((4096, 128), marks=pytest.mark.gpu)], ids=["1", "4097", "4096x128"]
)
def test_8bit_states_match_hand_written_adam(backend, shape):
    state = quantized_state(shape)
    float32_run = float32_state(shape)
    step_count, skipped = counters()
    float32_step, float32_skipped = counters()
    code_signed, code_unsigned = maps(True)
    for t in range(1, (2 if interpreted(backend) else STEPS) + 1):
        grad = torch.randn(shape, device=DEVICE)
        # Exact Adam from the moments the 8-bit state holds now: the op must do exactly this step, then
        # store the new moments as well as 8 bits can.
        held_m, held_v = moments(state, quantized=True)
        m, v, expected = hand_adam(held_m, held_v, grad, t)
        direction = step(backend, grad, state, step_count, skipped, quantized=True)
        assert direction.dtype == torch.float32 and direction.shape == shape
        assert_close_scaled(direction, expected, DIRECTION_RTOL, f"direction at step {t}")
        assert_quantized_holds(state["exp_avg"], state["absmax_avg"], m, code_signed)
        assert_quantized_holds(state["exp_avg_sq"], state["absmax_avg_sq"], v, code_unsigned)
        assert step_count.item() == t and skipped.item() == 0
        float32_direction = step("reference", grad, float32_run, float32_step, float32_skipped, quantized=False)
    # After several steps the 8-bit run still follows float32 Adam closely. (The signed map's most negative
    # code is -0.993, so a block's most negative moment loses up to 0.7% a step: ~4.5% after 5 steps at size 1.)
    relative = (direction - float32_direction).norm() / float32_direction.norm()
    assert relative.item() < 0.08


@pytest.mark.parametrize("backend", backend_params("adam_update"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_is_skipped(backend, quantized, bad, monkeypatch):
    if interpreted(backend) and bad == float("-inf"):
        pytest.skip("slow under TRITON_INTERPRET; nan and +inf cover it, the GPU run covers -inf")
    if backend == "triton":
        from gradnormlorp_kernels.triton import adam_update as triton_adam_update

        # Several check programs, the bad element in the first: the last to finish must still see its flag.
        monkeypatch.setattr(triton_adam_update, "_CHECK_BLOCK", 1024)
    shape = (17, 241)
    state = quantized_state(shape) if quantized else float32_state(shape)
    step_count, skipped = counters()
    warm_up = 1 if interpreted(backend) else 2
    for _ in range(warm_up):
        step(backend, torch.randn(shape, device=DEVICE), state, step_count, skipped, quantized)
    before = {k: v.clone() for k, v in state.items() if v is not None}
    held_m, held_v = moments(state, quantized)

    grad = torch.randn(shape, device=DEVICE)
    grad[3, 100] = bad
    direction = step(backend, grad, state, step_count, skipped, quantized)
    assert torch.equal(direction, torch.zeros_like(direction))
    for name, value in before.items():
        assert torch.equal(state[name], value), f"{name} changed on a skipped step"
    assert step_count.item() == warm_up and skipped.item() == 1

    # The next finite step carries on from the untouched state, counted as the next step.
    grad = torch.randn(shape, device=DEVICE)
    direction = step(backend, grad, state, step_count, skipped, quantized)
    _, _, expected = hand_adam(held_m, held_v, grad, warm_up + 1)
    assert_close_scaled(direction, expected, DIRECTION_RTOL, "direction after the skipped step")
    assert step_count.item() == warm_up + 1 and skipped.item() == 1


@pytest.mark.parametrize("backend", backend_params("adam_update"))
def test_hyperparameters_are_used(backend):
    # Different betas and eps give the hand-written answer for those values (not fixed defaults).
    shape = (5, 3)
    state = float32_state(shape)
    step_count, skipped = counters()
    grad = torch.randn(shape, device=DEVICE) * 1e-3
    direction = run_op(
        ops.adam_update, backend, grad, state["exp_avg"], state["exp_avg_sq"], None, None, None, None,
        step_count, skipped, 0.5, 0.75, 1e-3,
    )
    zeros = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    _, _, expected = hand_adam(zeros, zeros, grad, 1, 0.5, 0.75, 1e-3)
    assert_close_scaled(direction, expected, DIRECTION_RTOL, "direction")


@pytest.mark.parametrize("backend", other_backend_params("adam_update"))
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("numel", [1, 255, 257, 2047, 4097, 4 * 2048 + 300])
@pytest.mark.parametrize("target_programs", [1, 10**9], ids=["widest", "narrowest"])
def test_states_bit_exact_with_reference_op(backend, quantized, numel, target_programs, monkeypatch):
    # Tails: one element, fewer blocks than a program takes, a partial last block, several programs. Every
    # element written (the direction starts as NaN) and every state equal to the reference op's bit for bit.
    # Triton's programs take their widest tile (target 1 program) or one block each (an unreachable target).
    from gradnormlorp_kernels.triton import adam_update as triton_adam_update

    monkeypatch.setattr(triton_adam_update, "_TARGET_PROGRAMS", target_programs)
    code_signed, code_unsigned = maps(quantized)
    m, v = torch.randn(numel, device=DEVICE) * 1e-2, torch.rand(numel, device=DEVICE) * 1e-4
    if quantized:
        state = {}
        state["exp_avg"], state["absmax_avg"] = ops.quantize_blockwise.reference(m, code_signed)
        state["exp_avg_sq"], state["absmax_avg_sq"] = ops.quantize_blockwise.reference(v, code_unsigned)
    else:
        state = {"exp_avg": m, "exp_avg_sq": v, "absmax_avg": None, "absmax_avg_sq": None}
    expected = {name: None if value is None else value.clone() for name, value in state.items()}
    grad = torch.randn(numel, device=DEVICE) * 1e-2
    step_count, skipped = counters()
    expected_step, expected_skipped = counters()
    with poisoned_empty():
        direction = step(backend, grad, state, step_count, skipped, quantized)
    expected_direction = ops.adam_update.reference(
        grad, expected["exp_avg"], expected["exp_avg_sq"], expected["absmax_avg"], expected["absmax_avg_sq"],
        code_signed, code_unsigned, expected_step, expected_skipped, BETAS[0], BETAS[1], EPS,
    )
    for name, value in expected.items():
        assert value is None or torch.equal(state[name], value), f"{name} differs from the reference op"
    # The direction within rounding: under TRITON_INTERPRET it can differ from the reference in the last place.
    assert_close_scaled(direction, expected_direction, 1e-6, "direction")
    assert step_count.item() == expected_step.item() == 1
