"""GradNormLoRPAdamW (DESIGN.md section 3) against hand-written references and torch.optim.AdamW."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from gradnormlorp_kernels import GradNormLoRPAdamW, GradNormLoRPLinear
from gradnormlorp_kernels import optimizer as optimizer_module

# Reference ops unless a test takes the `dispatched` fixture (see conftest.py).
pytestmark = pytest.mark.usefixtures("reference_unless_dispatched")


# ---------------------------------------------------------------- helpers


def grad_sequence(shape, steps, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) for _ in range(steps)]


def low_rank_plus_noise(m, n, rank, noise, seed):
    """A matrix with `rank` dominant directions (decaying) and a small full-rank part."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    s = torch.logspace(1, 0, rank)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=gen)


def projector_of(state):
    return {k: state[k].clone() for k in ("left", "right") if k in state}


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class ReferenceGaLoreAdamW:
    """Hand-written float32 GaLore-style projected AdamW for one matrix.

    At steps t = 0, gap, 2 gap, ...: P / Q from the exact SVD of the gradient. Then R = P^T G (Q),
    Adam with bias correction on R, W <- W (1 - lr wd) - lr * scale * P N (Q^T).
    """

    def __init__(self, weight, lr, betas, eps, weight_decay, rank, gap, scale, proj_type):
        self.w = weight.detach().clone().float()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.gap, self.scale = rank, gap, scale
        self.left_side = proj_type in ("left", "two_sided")
        self.right_side = proj_type in ("right", "two_sided")
        self.t = 0
        self.m = self.v = self.P = self.Q = None

    def step(self, grad):
        g = grad.float()
        if self.t % self.gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            self.P = u[:, : self.rank] if self.left_side else None
            self.Q = vh[: self.rank].T if self.right_side else None
        r = g
        if self.P is not None:
            r = self.P.T @ r
        if self.Q is not None:
            r = r @ self.Q
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        n = m_hat / (v_hat.sqrt() + self.eps)
        if self.P is not None:
            n = self.P @ n
        if self.Q is not None:
            n = n @ self.Q.T
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * self.scale * n


# ---------------------------------------------------------------- (a) projected, fp32 states, full rank


@pytest.mark.parametrize("proj_type", ["left", "right", "two_sided"])
@pytest.mark.parametrize("shape", [(13, 7), (6, 11)])
def test_full_rank_projection_matches_reference(proj_type, shape, seed):
    rank = min(shape)
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    gap, scale, steps = 3, 0.5, 8
    weight = nn.Parameter(torch.randn(shape))
    reference = ReferenceGaLoreAdamW(weight, **hyper, rank=rank, gap=gap, scale=scale, proj_type=proj_type)
    opt = GradNormLoRPAdamW(
        [{"params": [weight], "rank": rank}], **hyper, update_proj_gap=gap, scale=scale,
        proj_type=proj_type, refresh="svd", state_bits=32,
    )
    for grad in grad_sequence(shape, steps, seed):
        weight.grad = grad.clone()
        opt.step()
        reference.step(grad)
        state = opt.state[weight]
        torch.testing.assert_close(weight.detach(), reference.w, rtol=2e-5, atol=2e-6)
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"], reference.m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], reference.v, rtol=1e-5, atol=1e-7)
        if reference.P is not None:
            torch.testing.assert_close(state["left"].float(), reference.P, rtol=1e-5, atol=1e-5)
        if reference.Q is not None:
            torch.testing.assert_close(state["right"].float(), reference.Q, rtol=1e-5, atol=1e-5)
    assert int(state["step"]) == steps and opt.skipped_steps() == 0


def test_low_rank_projection_matches_reference(seed):
    """Rank below full: the reference and the optimizer agree as well (left projector, SVD refresh)."""
    shape, rank = (20, 9), 4
    weight = nn.Parameter(torch.randn(shape))
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reference = ReferenceGaLoreAdamW(weight, **hyper, rank=rank, gap=4, scale=0.25, proj_type="left")
    opt = GradNormLoRPAdamW([{"params": [weight], "rank": rank}], **hyper, update_proj_gap=4,
                            proj_type="left", refresh="svd", state_bits=32)
    for grad in grad_sequence(shape, 9, seed):
        weight.grad = grad
        opt.step()
        reference.step(grad)
    torch.testing.assert_close(weight.detach(), reference.w, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- (b) plain parameters vs torch AdamW


@pytest.mark.parametrize("shape", [(1,), (4097,), (33, 5)])
def test_plain_parameters_match_torch_adamw(shape, seed):
    hyper = dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)
    ours = nn.Parameter(torch.randn(shape))
    theirs = nn.Parameter(ours.detach().clone())
    opt = GradNormLoRPAdamW([ours], **hyper, state_bits=32)
    ref = torch.optim.AdamW([theirs], **hyper)
    for grad in grad_sequence(shape, 6, seed):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[ours]["exp_avg"], ref.state[theirs]["exp_avg"])
    torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], ref.state[theirs]["exp_avg_sq"])


def test_plain_bf16_parameters_follow_fp32_adamw(seed):
    ours = nn.Parameter(torch.randn(300).to(torch.bfloat16))
    theirs = nn.Parameter(ours.detach().float().clone())
    opt = GradNormLoRPAdamW([ours], lr=1e-2, state_bits=32)
    ref = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.0)
    for grad in grad_sequence((300,), 4, seed):
        ours.grad, theirs.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        opt.step()
        ref.step()
    assert ours.dtype == torch.bfloat16 and opt.state[ours]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(ours.detach().float(), theirs.detach(), rtol=2e-2, atol=1e-2)


# ---------------------------------------------------------------- (c) 8-bit states


def _run(weight0, grads, **kwargs):
    weight = nn.Parameter(weight0.clone())
    opt = GradNormLoRPAdamW([{"params": [weight], **kwargs.pop("group", {})}], **kwargs)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
    return weight.detach(), opt


@pytest.mark.parametrize("projected", [True, False])
def test_8bit_states_close_to_fp32(projected, seed, dispatched):
    shape = (256, 64)
    weight0 = torch.randn(shape)
    grads = grad_sequence(shape, 10, seed)
    group = {"rank": 64} if projected else {}
    kwargs = dict(lr=1e-2, update_proj_gap=4, proj_type="left", refresh="svd")
    w32, opt32 = _run(weight0, grads, group=dict(group), state_bits=32, **kwargs)
    w8, opt8 = _run(weight0, grads, group=dict(group), state_bits=8, **kwargs)
    state = next(iter(opt8.state.values()))
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    numel = state["exp_avg"].numel()
    assert numel >= 4096
    assert state["absmax_exp_avg"].dtype == torch.float32
    assert state["absmax_exp_avg"].shape == (math.ceil(numel / 256),)
    moved = torch.linalg.vector_norm(w32 - weight0)
    assert moved > 0
    assert torch.linalg.vector_norm(w8 - w32) / moved < 0.05
    # 8-bit moments: one byte per element plus a float32 absmax per 256-element block.
    moment_keys = ("exp_avg", "exp_avg_sq", "absmax_exp_avg", "absmax_exp_avg_sq")
    state32 = next(iter(opt32.state.values()))
    bytes8 = sum(state[k].numel() * state[k].element_size() for k in moment_keys)
    bytes32 = sum(state32[k].numel() * state32[k].element_size() for k in moment_keys if k in state32)
    assert bytes8 == 2 * numel + 2 * 4 * math.ceil(numel / 256)
    assert bytes32 == 2 * 4 * numel
    assert opt32.state_bytes() - opt8.state_bytes() == bytes32 - bytes8


def test_small_tensors_stay_fp32_with_8bit(seed):
    small_plain = nn.Parameter(torch.randn(4095))
    big_plain = nn.Parameter(torch.randn(4096))
    small_proj = nn.Parameter(torch.randn(40, 30))  # rank 8 left: state 8 x 30
    opt = GradNormLoRPAdamW(
        [{"params": [small_plain, big_plain]}, {"params": [small_proj], "rank": 8}], state_bits=8, proj_type="left"
    )
    for p in (small_plain, big_plain, small_proj):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[small_plain]["exp_avg"].dtype == torch.float32
    assert "absmax_exp_avg" not in opt.state[small_plain]
    assert opt.state[big_plain]["exp_avg"].dtype == torch.uint8
    assert opt.state[big_plain]["exp_avg_sq"].dtype == torch.uint8
    assert opt.state[small_proj]["exp_avg"].shape == (8, 30)
    assert opt.state[small_proj]["exp_avg"].dtype == torch.float32


# ---------------------------------------------------------------- (d) projection sides


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (24, 24)])
def test_std_projects_the_smaller_side_as_galore(shape):
    rank = 5
    weight = nn.Parameter(torch.randn(shape))
    opt = GradNormLoRPAdamW([{"params": [weight], "rank": rank}], proj_type="std", state_bits=32)
    weight.grad = torch.randn(shape)
    opt.step()
    state = opt.state[weight]
    assert sorted(state["exp_avg"].shape) == sorted((rank, max(shape)))
    projectors = projector_of(state)
    assert len(projectors) == 1
    (side, p), = projectors.items()
    assert p.shape == (min(shape), rank)
    assert side == ("right" if shape[0] >= shape[1] else "left")
    # Orthonormal columns.
    torch.testing.assert_close(p.T.float() @ p.float(), torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("proj_type,state_shape", [("left", (5, 20)), ("right", (48, 5)), ("two_sided", (5, 5))])
def test_explicit_sides(proj_type, state_shape):
    weight = nn.Parameter(torch.randn(48, 20))
    opt = GradNormLoRPAdamW([{"params": [weight], "rank": 5}], proj_type=proj_type, state_bits=32)
    weight.grad = torch.randn(48, 20)
    opt.step()
    state = opt.state[weight]
    assert tuple(state["exp_avg"].shape) == state_shape
    assert ("left" in state) == (proj_type in ("left", "two_sided"))
    assert ("right" in state) == (proj_type in ("right", "two_sided"))


# ---------------------------------------------------------------- (e) refresh schedule and quality


@pytest.mark.parametrize("refresh", ["randomized", "svd"])
def test_refresh_every_gap_steps_staggered(refresh):
    gap, steps, count = 6, 20, 4
    weights = [nn.Parameter(torch.randn(24, 16)) for _ in range(count)]
    opt = GradNormLoRPAdamW([{"params": weights, "rank": 4}], update_proj_gap=gap, refresh=refresh, state_bits=32)
    refresh_steps = [[] for _ in range(count)]
    previous = [None] * count
    for t in range(steps):
        for w in weights:
            w.grad = torch.randn_like(w)
        opt.step()
        for i, w in enumerate(weights):
            current = projector_of(opt.state[w])
            if previous[i] is None or any(not torch.equal(current[k], previous[i][k]) for k in current):
                refresh_steps[i].append(t)
            previous[i] = current
    for i, times in enumerate(refresh_steps):
        assert times[0] == 0, times
        gaps = [b - a for a, b in zip(times[1:], times[2:])]
        assert gaps and all(d == gap for d in gaps), (i, times)
        # A randomized refresh changes the projector the step after it is due (it is finished then).
        assert 0 < times[1] <= gap + (refresh == "randomized"), (i, times)
    # Staggered: after the first step the matrices do not all refresh together.
    later = [set(t[1:]) for t in refresh_steps]
    assert len({min(t) for t in later}) == count
    assert not set.intersection(*later)


def _trace_projectors(gap, refresh, steps, seed, after_step=None):
    """Steps a left-projected (48, 20) matrix on fresh gradients: its projector after each step, and for each
    update the index of the (earliest) projector whose span holds the change. `after_step(t, state)`."""
    w = nn.Parameter(torch.zeros(48, 20))  # small weights: their change is exact to float32 rounding
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 4}], proj_type="left", update_proj_gap=gap,
                            refresh=refresh, state_bits=32)
    gen = torch.Generator().manual_seed(seed)
    projectors, used = [], []
    for t in range(steps):
        w.grad = torch.randn(48, 20, generator=gen)
        before_w = w.detach().clone()
        opt.step()
        projectors.append(opt.state[w]["left"].clone())
        change = w.detach() - before_w
        off = [float((change - q @ (q.T @ change)).norm() / change.norm()) for q in projectors]
        used.append(min(range(len(off)), key=off.__getitem__))
        assert off[used[-1]] <= 1e-4, (refresh, t, off)
        if after_step is not None:
            after_step(t, opt.state[w])
    return projectors, used


def test_randomized_refresh_takes_effect_two_steps_later(seed):
    """A randomized refresh is sketched after the due step's update and finished after the next step's,
    so both of those updates use the old projector and the one after uses the new one; an SVD refresh comes
    before the due step's update, as in GaLore."""
    for refresh in ("randomized", "svd"):
        projectors, used = _trace_projectors(3, refresh, 6, seed)
        if refresh == "randomized":  # calls == 3 is due: sketched at t=3, finished at t=4, used from t=5
            assert torch.equal(projectors[3], projectors[2]), "the due step must not change it"
            assert not torch.equal(projectors[4], projectors[3]), "no refresh finished the step after"
            assert used[3] < 3 and used[4] < 3 and used[5] == 4, used
        else:  # the due step's update already uses the new projector
            assert not torch.equal(projectors[3], projectors[2]), "no refresh at the due step"
            assert used[3] == 3, used


@pytest.mark.parametrize("solve_lag", ["host", "device"])
def test_spread_refresh_takes_effect_five_or_seven_steps_later(seed, solve_lag, monkeypatch):
    """From SPREAD_MIN_GAP on, a randomized refresh's sketch runs one part a step from the due step (three
    parts: two power iterations) and is finished HOST_SOLVE_LAG = 2 steps after its last part: the due step and
    the four after it use the old projector, the fifth the new one. Where cuSOLVER's worker solves it (a GPU, k
    above the host's limit) DEVICE_SOLVE_LAG = 4 steps after: the seventh. (Here on the CPU the device lag is
    put in the host's place.)"""
    from gradnormlorp_kernels.optimizer import DEVICE_SOLVE_LAG, HOST_SOLVE_LAG, POWER_ITERS, SPREAD_MIN_GAP

    solve_steps = HOST_SOLVE_LAG if solve_lag == "host" else DEVICE_SOLVE_LAG
    monkeypatch.setattr(optimizer_module, "HOST_SOLVE_LAG", solve_steps)
    gap, lag = SPREAD_MIN_GAP, POWER_ITERS + 1 + solve_steps
    assert lag == {"host": 5, "device": 7}[solve_lag]

    def in_flight(t, state):  # begun at the due step, finished at the last step of the lag
        assert ("pending_finish_call" in state) == (gap <= t < gap + lag - 1), t

    projectors, used = _trace_projectors(gap, "randomized", gap + lag + 2, seed, in_flight)
    for t in range(gap, gap + lag - 1):
        assert torch.equal(projectors[t], projectors[gap - 1]), f"step {t} must not change the projector"
    assert not torch.equal(projectors[gap + lag - 1], projectors[gap - 1]), "no refresh finished"
    assert all(used[t] < gap for t in range(gap, gap + lag)) and used[gap + lag] == gap + lag - 1, used


@pytest.mark.parametrize("gap", [1, 2])
def test_refreshes_due_before_the_last_one_landed(gap, seed):
    """With a gap shorter than a refresh's two phases, each due refresh first finishes the pending one: the
    projectors stay orthonormal and keep following the gradient."""
    w = nn.Parameter(torch.zeros(40, 24))
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 3}], proj_type="left", update_proj_gap=gap, state_bits=32)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.linalg.qr(torch.randn(40, 3, generator=gen)).Q
    for _ in range(8):
        w.grad = direction @ torch.randn(3, 24, generator=gen) + 1e-3 * torch.randn(40, 24, generator=gen)
        opt.step()
    projector = opt.state[w]["left"]
    torch.testing.assert_close(projector.T @ projector, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.linalg.svdvals(direction.T @ projector).min() > 0.99


def test_randomized_refresh_captures_the_gradient(seed):
    m, n, rank = 96, 64, 8
    grad = low_rank_plus_noise(m, n, rank, noise=0.05, seed=seed)
    captured = {}
    for refresh in ("randomized", "svd"):
        for proj_type, side in (("left", "left"), ("right", "right")):
            weight = nn.Parameter(torch.zeros(m, n))
            opt = GradNormLoRPAdamW([{"params": [weight], "rank": rank}], proj_type=proj_type, refresh=refresh,
                                    state_bits=32)
            weight.grad = grad.clone()
            opt.step()
            p = opt.state[weight][side].float()
            torch.testing.assert_close(p.T @ p, torch.eye(rank), atol=1e-4, rtol=0)
            projected = p.T @ grad if side == "left" else grad @ p
            captured[refresh, side] = float(projected.square().sum() / grad.square().sum())
    for side in ("left", "right"):
        assert captured["svd", side] > 0.9
        assert captured["randomized", side] >= 0.995 * captured["svd", side], captured


# ---------------------------------------------------------------- (f) checkpoints


def _fill_grads(params, seed, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_bits", [8, 32])
def test_state_dict_round_trip_weights_only(dtype, state_bits, seed, dispatched):
    params = [nn.Parameter(torch.randn(128, 64).to(dtype)), nn.Parameter(torch.randn(64).to(dtype)),
              nn.Parameter(torch.randn(5000).to(dtype))]
    groups = lambda ps: [{"params": ps[:1], "rank": 64}, {"params": ps[1:]}]  # noqa: E731
    opt = GradNormLoRPAdamW(groups(params), state_bits=state_bits, proj_type="left", update_proj_gap=2)
    for t in range(3):
        _fill_grads(params, seed + t)
        opt.step()
    loaded = save_load(opt.state_dict())

    clones = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = GradNormLoRPAdamW(groups(clones), state_bits=state_bits, proj_type="left", update_proj_gap=2)
    fresh.load_state_dict(loaded)
    for p, q in zip(params, clones):
        a, b = opt.state[p], fresh.state[q]
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert b[key].dtype == value.dtype, (key, b[key].dtype, value.dtype)
                assert torch.equal(b[key], value), key
            else:
                assert b[key] == value, key
    # Float32 states of a bf16 parameter stay float32 (torch's loader would cast them to bf16).
    float32_states = [k for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor) and v.dtype == torch.float32]
    assert {"step", "exp_avg_sq" if state_bits == 32 else "absmax_exp_avg_sq"} <= set(float32_states)
    # Both continue identically.
    for t in range(3, 6):
        _fill_grads(params, seed + t)
        _fill_grads(clones, seed + t)
        opt.step()
        fresh.step()
    for p, q in zip(params, clones):
        assert torch.equal(p, q)


class SmallNet(nn.Module):
    """Two full-mode GradNormLoRPLinear layers (directions projected) around a nonlinearity."""

    def __init__(self):
        super().__init__()
        self.fc1 = GradNormLoRPLinear(96, 192, mode="full")
        self.fc2 = GradNormLoRPLinear(192, 96, mode="full")
        self.out = nn.Linear(96, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def _batch(step):
    gen = torch.Generator().manual_seed(1000 + step % 3)  # three batches, in turn
    return torch.randn(16, 96, generator=gen), torch.randint(0, 8, (16,), generator=gen)


def _train_span(model, opt, start, stop):
    losses = []
    for t in range(start, stop):
        x, y = _batch(t)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _make(state_bits, refresh, seed, gap=3):
    torch.manual_seed(seed)
    model = SmallNet()
    # rank 48: states 48 x max(out, in) (>= 4096 elements, so 8-bit when state_bits=8).
    opt = GradNormLoRPAdamW(model, lr=1e-2, rank=48, update_proj_gap=gap, state_bits=state_bits, refresh=refresh,
                            weight_decay=0.01)
    return model, opt


@pytest.mark.parametrize("state_bits,refresh,cut,gap", [
    (8, "randomized", 4, 3), (8, "randomized", 5, 3), (32, "svd", 4, 3),
    (8, "randomized", 5, 8), (8, "randomized", 6, 8), (8, "randomized", 7, 8), (32, "randomized", 10, 8),
])
def test_resume_is_bit_exact(state_bits, refresh, cut, gap, seed, dispatched, monkeypatch):
    """Gap 3: cut 4 falls between the sketch (step 3) and the finish (step 4) of fc1's refresh; cut 5 after
    both. Gap 8 with sketches spread from that gap on (fc2's refresh due at step 4, fc1's at 8): cuts 5 and 6
    fall between parts of fc2's sketch (the checkpoint completes it), 7 between its last part and its
    finish, 10 inside fc1's."""
    monkeypatch.setattr(optimizer_module, "SPREAD_MIN_GAP", 8)
    total = 10 if gap == 3 else 16
    model, opt = _make(state_bits, refresh, seed, gap)
    assert any(g["project"] for g in opt.param_groups)
    straight = _train_span(model, opt, 0, total)

    model, opt = _make(state_bits, refresh, seed, gap)
    first = _train_span(model, opt, 0, cut)
    if refresh == "randomized" and (cut == 4 or gap == 8):  # the cut falls inside a refresh
        assert any("pending_finish_call" in state for state in opt.state.values())
    checkpoint = save_load({"model": model.state_dict(), "optimizer": opt.state_dict()})
    del model, opt
    model, opt = _make(state_bits, refresh, seed + 1, gap)  # a different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    second = _train_span(model, opt, cut, total)
    resumed = first + second
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), (straight, resumed)
    if state_bits == 8:
        for p in (model.fc1.direction, model.fc2.direction):
            assert opt.state[p]["exp_avg"].dtype == torch.uint8
            assert sorted(opt.state[p]["exp_avg"].shape) == sorted((48, max(p.shape)))
    assert float(straight[-1]) < float(straight[0])  # steps 0 and 9 see the same batch


def test_loading_a_checkpoint_mid_sketch_drops_the_sketch_in_progress(seed, monkeypatch):
    """The same optimizer loads an earlier checkpoint while a spread sketch is in progress: that sketch is
    dropped, and training from the checkpoint repeats the straight run bit for bit."""
    monkeypatch.setattr(optimizer_module, "SPREAD_MIN_GAP", 8)
    straight = _train_span(*_make(8, "randomized", seed, gap=8), 0, 12)
    model, opt = _make(8, "randomized", seed, gap=8)
    _train_span(model, opt, 0, 3)
    checkpoint = save_load({"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train_span(model, opt, 3, 5)  # fc2's refresh, due at step 4, is in progress
    assert opt._sketching
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert not opt._sketching
    resumed = _train_span(model, opt, 3, 12)
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed)), (straight[3:], resumed)


# ---------------------------------------------------------------- (g) non-finite gradients


def _snapshot(opt, params):
    return [
        (p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()})
        for p in params
    ]


def _states_equal(a, b):
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else True for k in a)


@pytest.mark.parametrize("state_bits", [8, 32])
@pytest.mark.parametrize("bad_step", [0, 3, 4])  # the first step, a plain step, a refresh step (gap 4)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_only_that_matrix(state_bits, bad_step, poison, seed):
    projected = [nn.Parameter(torch.randn(128, 64)) for _ in range(2)]
    plain = [nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(7))]
    opt = GradNormLoRPAdamW(
        [{"params": projected, "rank": 64}, {"params": plain}], state_bits=state_bits, proj_type="left",
        update_proj_gap=4, refresh="randomized", weight_decay=0.1,
    )
    params = projected + plain
    bad = {projected[0], plain[0]}
    for t in range(bad_step + 2):
        _fill_grads(params, seed + t)
        if t == bad_step:
            for p in bad:
                p.grad.view(-1)[3] = poison
            before = _snapshot(opt, params)
        opt.step()
        if t == bad_step:
            after = _snapshot(opt, params)
            for p, (w0, s0), (w1, s1) in zip(params, before, after):
                if p in bad:
                    assert torch.equal(w0, w1), "weight of the skipped matrix changed"
                    if s0:  # states that existed are untouched (projectors included)
                        for k, v in s0.items():
                            if isinstance(v, torch.Tensor) and k != "skipped":
                                assert torch.equal(v, s1[k]), k
                else:
                    assert not torch.equal(w0, w1), "a finite matrix was not updated"
            assert opt.skipped_steps() == 2
        assert all(bool(torch.isfinite(p).all()) for p in params)
        for p in params:
            if "exp_avg" in opt.state[p]:
                assert bool(torch.isfinite(opt.state[p]["exp_avg"].float()).all())
    # The step after the bad one updates the skipped matrices again.
    assert opt.skipped_steps() == 2
    finite_steps = bad_step + 1
    assert int(opt.state[projected[1]]["step"]) == bad_step + 2
    assert int(opt.state[projected[0]]["step"]) == finite_steps
    assert int(opt.state[plain[0]]["step"]) == finite_steps


# ---------------------------------------------------------------- (h) groups


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.full = GradNormLoRPLinear(16, 24, mode="full")
        self.adapter = GradNormLoRPLinear(24, 16, rank=4, mode="adapter")
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 10)


def test_model_constructor_groups():
    model = Mixed()
    opt = GradNormLoRPAdamW(model, rank=8, state_bits=32)
    projected = [p for g in opt.param_groups if g["project"] for p in g["params"]]
    plain = [p for g in opt.param_groups if not g["project"] for p in g["params"]]
    assert len(projected) == 1 and projected[0] is model.full.direction
    expected_plain = {id(p) for n, p in model.named_parameters() if p.requires_grad and p is not model.full.direction}
    assert {id(p) for p in plain} == expected_plain
    assert all(id(p) not in expected_plain for p in model.frozen.parameters())
    assert id(model.adapter.base_weight) not in {id(p) for p in plain}
    # One step trains what it should.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 10, (3, 5))
    x = model.embed(ids)
    loss = model.head(model.adapter(model.full(x)) + model.frozen(x)).square().mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == p.requires_grad or n == "adapter.lora_A", n  # B = 0 at init: A gets no gradient yet
    direction = model.full.direction
    assert opt.state[direction]["exp_avg"].shape == (max(direction.shape), 8)


def test_galore_style_param_groups():
    big = nn.Parameter(torch.randn(40, 24))
    other = nn.Parameter(torch.randn(40, 24))
    vec = nn.Parameter(torch.randn(40))
    opt = GradNormLoRPAdamW(
        [{"params": [big], "rank": 6, "update_proj_gap": 7, "scale": 0.5, "proj_type": "right"},
         {"params": [other, vec]}],
        lr=1e-3, state_bits=32,
    )
    g0, g1 = opt.param_groups
    assert g0["project"] and not g1["project"]
    assert (g0["rank"], g0["update_proj_gap"], g0["scale"], g0["proj_type"]) == (6, 7, 0.5, "right")
    for p in (big, other, vec):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[big]["exp_avg"].shape == (40, 6)
    assert opt.state[other]["exp_avg"].shape == (40, 24)
    assert "left" not in opt.state[other] and "right" not in opt.state[other]
    # "project": True without "rank" takes the default rank; "project": False with a rank stays plain.
    p2 = nn.Parameter(torch.randn(30, 20))
    p3 = nn.Parameter(torch.randn(30, 20))
    opt = GradNormLoRPAdamW([{"params": [p2], "project": True}, {"params": [p3], "rank": 4, "project": False}],
                            rank=5, state_bits=32)
    p2.grad, p3.grad = torch.randn_like(p2), torch.randn_like(p3)
    opt.step()
    assert sorted(opt.state[p2]["exp_avg"].shape) == [5, 30]
    assert opt.state[p3]["exp_avg"].shape == (30, 20)


def test_closure_and_no_grad_parameters():
    a = nn.Parameter(torch.randn(10))
    b = nn.Parameter(torch.randn(10))
    opt = GradNormLoRPAdamW([a, b], state_bits=32)

    def closure():
        opt.zero_grad()
        loss = a.square().sum()
        loss.backward()
        return loss

    b_before = b.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert torch.equal(b, b_before) and b not in opt.state


def test_lr_scheduler_and_zero_lr(seed):
    w = nn.Parameter(torch.randn(24, 16))
    v = nn.Parameter(torch.randn(16))
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 4}, {"params": [v]}], lr=1e-2, state_bits=32, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step == 0 else 1.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    before = (w.detach().clone(), v.detach().clone())
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    opt.step()
    sched.step()
    # lr 0: no update and no decay, but the moments did see the gradient.
    assert torch.equal(w, before[0]) and torch.equal(v, before[1])
    assert int(opt.state[w]["step"]) == 1 and bool(opt.state[w]["exp_avg"].abs().sum() > 0)
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    opt.step()
    assert not torch.equal(w, before[0]) and not torch.equal(v, before[1])


def test_public_signature_defaults():
    import inspect

    params = inspect.signature(GradNormLoRPAdamW).parameters
    expected = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_proj_gap=200,
                    scale=0.25, proj_type="std", refresh="randomized", state_bits=8)
    assert list(params)[0] == "params_or_model"
    for name, value in expected.items():
        assert params[name].default == value, name


@pytest.mark.parametrize("refresh", ["randomized", "svd"])
@pytest.mark.parametrize("kind", ["zero", "rank1"])
def test_degenerate_gradients_give_orthonormal_projectors(refresh, kind, seed):
    """An all-zero gradient (layer not reached) or one of rank below `rank`: still a valid step."""
    w = nn.Parameter(torch.randn(40, 24))
    start = w.detach().clone()
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 8}], refresh=refresh, state_bits=32, update_proj_gap=2)
    for _ in range(4):
        w.grad = torch.zeros(40, 24) if kind == "zero" else torch.randn(40, 1) @ torch.randn(1, 24)
        opt.step()
    p = opt.state[w]["right"].float()  # std on a tall matrix: projector on the smaller (input) side
    torch.testing.assert_close(p.T @ p, torch.eye(8), atol=1e-5, rtol=0)
    assert bool(torch.isfinite(w).all()) and opt.skipped_steps() == 0
    assert torch.equal(w, start) == (kind == "zero")


def test_adapter_factors_projected_by_param_group(seed):
    """Adapter mode with the paper's Definition 1: lora_A / lora_B in a projected group."""
    layer = GradNormLoRPLinear(48, 40, rank=8, mode="adapter")
    with torch.no_grad():
        layer.lora_B.normal_()
    opt = GradNormLoRPAdamW(
        [{"params": [layer.lora_A, layer.lora_B], "rank": 4}, {"params": [layer.magnitude]}], lr=1e-2, state_bits=32
    )
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(6, 48)).square().mean().backward()
        opt.step()
    assert sorted(opt.state[layer.lora_A]["exp_avg"].shape) == [4, 48]
    assert sorted(opt.state[layer.lora_B]["exp_avg"].shape) == [4, 40]
    assert all(not torch.equal(b, p) for b, p in zip(before, (layer.lora_A, layer.lora_B, layer.magnitude)))
