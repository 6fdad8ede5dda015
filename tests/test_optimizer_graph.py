"""The optimizer's CUDA-graph step against its launch-by-launch step, on a GPU: bit-identical weights and
states over many steps (refreshes, an lr schedule, a non-finite gradient, weight decay, plain groups,
8-bit and float32 moments), graphs really replayed, and gradients that move between steps still right.

    python -m pytest -m gpu tests/test_optimizer_graph.py
"""

import pytest
import torch

from gradnormlorp_kernels import GradNormLoRPAdamW, _device_eigh, _host_eigh
from gradnormlorp_kernels import optimizer as optimizer_module

pytestmark = pytest.mark.gpu

# (out, in): square, tall, wide, one that straddles 8-bit blocks (4097 elements) and a small float32 one.
PROJECTED_SHAPES = [(64, 64), (96, 48), (40, 136), (17, 241), (8, 24)]
PLAIN_SHAPES = [(1,), (4097,), (33,)]
# A gap from which the tests below have the optimizer spread its sketches over steps.
SPREAD_GAP = 8


@pytest.fixture
def spread(monkeypatch):
    monkeypatch.setattr(optimizer_module, "SPREAD_MIN_GAP", SPREAD_GAP)


@pytest.fixture
def device_solves(monkeypatch):
    """Every eigendecomposition on cuSOLVER from the worker (`_device_eigh`), as those of k > MAX_K are;
    yields the list of the jobs started."""
    monkeypatch.setattr(_host_eigh, "MAX_K", 0)
    started = []
    start = _device_eigh.start

    def counted(*args):
        started.append(start(*args))
        return started[-1]

    monkeypatch.setattr(_device_eigh, "start", counted)
    return started


def _make(dtype, cuda_graph, seed=0, shapes=PROJECTED_SHAPES, **kwargs):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    projected = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype)) for s in shapes]
    plain = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype)) for s in PLAIN_SHAPES]
    kwargs.setdefault("update_proj_gap", 3)
    optimizer = GradNormLoRPAdamW(
        [{"params": projected, "project": True}, {"params": plain, "weight_decay": 0.1}],
        lr=1e-2, rank=4, cuda_graph=cuda_graph, **kwargs,
    )
    return projected + plain, optimizer


def _gradients(params, step, dtype):
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    grads = [torch.randn(p.shape, device="cuda", generator=generator).to(dtype) for p in params]
    if step == 5:
        grads[1][0, 0] = float("nan")  # one matrix skips this step
    if step == 6:
        grads[-1][0] = float("inf")  # and one plain tensor the next
    return grads


def _assert_same(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key, value in opt_a.state[a].items():
            other = opt_b.state[b][key]
            if isinstance(value, torch.Tensor):
                # A pending sketch of a non-finite gradient is NaN on both paths.
                torch.testing.assert_close(value, other, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"state {key}: {m}")
            else:
                assert value == other, key


def _step_both(steps, dtype, kwargs, persistent_grads, start=0, made=None):
    (graphed, opt_graphed), (eager, opt_eager) = made or (_make(dtype, True, **kwargs), _make(dtype, False, **kwargs))
    buffers = [torch.empty_like(p) for p in graphed]
    for step in range(start, start + steps):
        for group in (opt_graphed.param_groups, opt_eager.param_groups):
            for g in group:
                g["lr"] = 1e-2 / (1 + step)  # a schedule: no recapture needed
        grads = _gradients(graphed, step, dtype)
        for p, q, g, buffer in zip(graphed, eager, grads, buffers):
            if persistent_grads:
                p.grad = buffer.copy_(g)
            else:
                p.grad = g.clone()
            q.grad = g.clone()
        opt_graphed.step()
        opt_eager.step()
        _assert_same(graphed, opt_graphed, eager, opt_eager)
    return (graphed, opt_graphed), (eager, opt_eager)


@pytest.mark.parametrize("state_bits", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_step_is_bit_identical_and_replays(dtype, state_bits):
    (_, optimizer), _ = _step_both(10, dtype, dict(state_bits=state_bits), persistent_grads=True)
    assert set(optimizer._graphs) == {0, 1}
    for graphs in optimizer._graphs.values():
        assert graphs.captures == 1 and graphs.reuses == 8 and not graphs.given_up


@pytest.mark.parametrize("gap", [1, 2])
def test_graph_step_with_refreshes_due_before_the_last_one_landed(gap):
    """A gap of 1: every step finishes a matrix's pending refresh and sketches its next one; 2: the two
    phases of different refreshes meet."""
    (_, optimizer), _ = _step_both(8, torch.bfloat16, dict(update_proj_gap=gap), persistent_grads=True)
    assert optimizer._finish_graphs and all(g.graph is not None for g in optimizer._finish_graphs.values())


def test_spread_sketches_of_one_shape_in_progress_together(spread):
    """Spread sketches (one part a step); eight matrices of one shape come due a step apart, so several
    sketches of that shape are in progress at once, each in its own sketch graph."""
    made = tuple(_make(torch.bfloat16, graphed, shapes=[(48, 32)] * 8, update_proj_gap=SPREAD_GAP)
                 for graphed in (True, False))
    (_, optimizer), _ = _step_both(2 * SPREAD_GAP + 4, torch.bfloat16, {}, persistent_grads=True, made=made)
    assert max(len(graphs) for graphs in optimizer._sketch_graphs.values()) >= 2


def test_moving_gradients_stay_correct():
    (_, optimizer), _ = _step_both(12, torch.bfloat16, dict(weight_decay=0.05), persistent_grads=False)
    assert all(graphs.captures >= 1 for graphs in optimizer._graphs.values())


@pytest.mark.parametrize("gap", [3, SPREAD_GAP])
def test_state_dict_round_trip_between_graph_steps(gap, spread):
    """At gap SPREAD_GAP the cut falls inside a spread sketch (the checkpoint completes it)."""
    made = _step_both(4, torch.bfloat16, dict(update_proj_gap=gap), persistent_grads=True)
    (graphed, optimizer), eager = made
    saved = optimizer.state_dict()
    params, restored = _make(torch.bfloat16, True, update_proj_gap=gap)
    with torch.no_grad():
        for p, q in zip(params, graphed):
            p.copy_(q)
    restored.load_state_dict(saved)
    _step_both(5 + gap, torch.bfloat16, {}, persistent_grads=True, start=4, made=((params, restored), eager))
    assert restored._graphs and all(g.reuses > 0 for g in restored._graphs.values())


def test_device_solved_refreshes_are_bit_identical(spread, device_solves):
    """k above the host's limit: each sketch's eigendecomposition starts on the cuSOLVER worker when the sketch
    completes, and the refresh finishes DEVICE_SOLVE_LAG steps after the last part (graph and eager alike)."""
    made = tuple(_make(torch.bfloat16, graphed, shapes=[(48, 32)] * 4 + PROJECTED_SHAPES, update_proj_gap=SPREAD_GAP)
                 for graphed in (True, False))
    (_, optimizer), _ = _step_both(2 * SPREAD_GAP + 6, torch.bfloat16, {}, persistent_grads=True, made=made)
    assert len(device_solves) >= 9, "the later refreshes start jobs"
    assert all(job._future.done() for job in device_solves)


@pytest.mark.parametrize("occasion", [0, 2])
def test_state_dict_round_trip_inside_device_solved_refreshes(occasion, spread, device_solves):
    """A checkpoint taken while solves are in flight on the worker (sketches complete, refreshes not finished)
    resumes with the same bits: the loaded pending sketches are solved by the same routine on the step that
    finishes them. `occasion`: how many such steps to pass before the cut."""
    # Two matrices due half a gap apart: some steps have neither sketching.
    shapes = [(48, 32), (40, 136)]
    made = tuple(_make(torch.bfloat16, graphed, shapes=shapes, update_proj_gap=SPREAD_GAP) for graphed in (True, False))
    made = _step_both(1, torch.bfloat16, {}, persistent_grads=True, made=made)
    cut, seen = 1, 0
    while True:
        (graphed, optimizer), eager = made
        in_flight = any(optimizer._pending(state) for state in optimizer.state.values())
        if in_flight and not optimizer._sketching and not eager[1]._sketching:
            if seen == occasion:
                break
            seen += 1
        assert cut < 4 * SPREAD_GAP, "no step with solves in flight and no sketch in progress"
        made = _step_both(1, torch.bfloat16, {}, persistent_grads=True, start=cut, made=made)
        cut += 1
    saved = optimizer.state_dict()
    params, restored = _make(torch.bfloat16, True, shapes=shapes, update_proj_gap=SPREAD_GAP)
    with torch.no_grad():
        for p, q in zip(params, graphed):
            p.copy_(q)
    restored.load_state_dict(saved)
    _step_both(SPREAD_GAP + 4, torch.bfloat16, {}, persistent_grads=True, start=cut, made=((params, restored), eager))


def test_graph_step_with_exact_refreshes():
    """refresh="svd": the refresh writes the projectors before the update, so its bookkeeping runs before
    the replay (a randomized refresh's runs after the replay is launched)."""
    (_, optimizer), _ = _step_both(8, torch.bfloat16, dict(refresh="svd"), persistent_grads=True)
    assert optimizer._graphs[0].reuses > 0


def test_mismatched_gradient_raises_before_the_replay_and_changes_nothing():
    """A gradient swapped for one of another shape through `.data` (which skips `p.grad = ...`'s checks) is
    caught by the graphed step's checks: ValueError, and no weight or state changed."""
    (graphed, optimizer), _ = _step_both(3, torch.bfloat16, {}, persistent_grads=True)
    for p in graphed:
        p.grad = torch.randn_like(p)
    graphed[1].grad.data = torch.randn(graphed[1].shape[::-1], device="cuda").to(torch.bfloat16)
    before = [p.clone() for p in graphed]
    calls = [optimizer.state[p].get("calls") for p in graphed]
    with pytest.raises(ValueError, match="does not match its parameter"):
        optimizer.step()
    for p, kept, call in zip(graphed, before, calls):
        torch.testing.assert_close(p, kept, rtol=0, atol=0)
        assert optimizer.state[p].get("calls") == call


def test_parameters_and_projectors_that_move_are_stepped_where_they_are_now():
    """A weight moved to new memory (`p.data = ...`) and a projector replaced by a new tensor of other values:
    the next graphed step steps and reads the new tensors (bit-identical to the launch-by-launch step)."""
    made = _step_both(3, torch.bfloat16, {}, persistent_grads=True)
    (graphed, optimizer), (eager, opt_eager) = made
    for opt, params in ((optimizer, graphed), (opt_eager, eager)):
        params[0].data = params[0].data.clone()
        state = opt.state[params[2]]
        side = "left" if "left" in state else "right"
        state[side] = state[side].flip(1).contiguous()
    _step_both(3, torch.bfloat16, {}, persistent_grads=True, start=3, made=made)
    assert optimizer._graphs[0].captures >= 2
