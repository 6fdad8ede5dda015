"""GradNormLoRPLinear (both modes) against autograd through the dense formula of DESIGN.md section 2."""

from __future__ import annotations

import io
import zlib

import pytest
import torch
from torch import nn

from gradnormlorp_kernels import GradNormLoRPLinear

# Reference ops unless a test takes the `dispatched` fixture (see conftest.py).
pytestmark = pytest.mark.usefixtures("reference_unless_dispatched")


MODES = ("adapter", "full")
# (in_features, out_features, rank): odd sizes, ranks at both ends of [1, min(in, out)].
SHAPES = [
    (1, 1, 1),
    (1, 17, 1),
    (3, 129, 3),
    (17, 3, 2),
    (129, 17, 17),
    (17, 129, 5),
    (129, 129, 1),
]
LEADING = [(7,), (2, 5)]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_(layer: GradNormLoRPLinear, seed: int) -> GradNormLoRPLinear:
    """Move a layer away from its init (B = 0, M = ||W0||) so that every gradient term is exercised."""
    gen = _generator(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
        # Magnitudes: away from zero (u is recovered from the output through M) and not the row norms.
        m = torch.rand(layer.magnitude.shape, generator=gen, dtype=torch.float64) + 0.5
        layer.magnitude.copy_(m.to(layer.magnitude.dtype))
    return layer


def make_layer(in_f, out_f, rank, mode, dtype, seed, bias=True, detach_norm=False, alpha=None):
    torch.manual_seed(seed)
    alpha = float(2 * rank + 1) if alpha is None else alpha
    layer = GradNormLoRPLinear(
        in_f, out_f, rank=rank, alpha=alpha, mode=mode, bias=bias, detach_norm=detach_norm, dtype=dtype
    )
    return randomize_(layer, seed + 1)


def trainable(layer: GradNormLoRPLinear) -> dict[str, torch.Tensor]:
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


def dense_forward(layer: GradNormLoRPLinear, x, params: dict[str, torch.Tensor], detach_norm: bool):
    """The dense formula, differentiated by autograd: W = diag(M / ||W'||_row) W'."""
    if layer.mode == "adapter":
        w_prime = params["base_weight"] + layer.scaling * (params["lora_B"] @ params["lora_A"])
    else:
        w_prime = params["direction"]
    norm = torch.linalg.vector_norm(w_prime, dim=1)
    if detach_norm:
        norm = norm.detach()
    weight = (params["magnitude"] / norm)[:, None] * w_prime
    y = x @ weight.T
    if params.get("bias") is not None:
        y = y + params["bias"]
    return y


def layer_run(layer, x, grad_out):
    """Output and gradients (input + trainable parameters) of the layer itself."""
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(grad_out)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in trainable(layer).items()})
    return y.detach(), grads


def dense_run(layer, x, grad_out, dtype, detach_norm):
    """Same quantities from autograd through the dense formula, in `dtype`."""
    params = {name: p.detach().to(dtype).clone().requires_grad_(p.requires_grad) for name, p in layer.named_parameters()}
    x = x.detach().to(dtype).clone().requires_grad_(True)
    y = dense_forward(layer, x, params, detach_norm)
    y.backward(grad_out.to(dtype))
    grads = {"x": x.grad}
    grads.update({name: params[name].grad for name in trainable(layer)})
    return y.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def expected_trainable(mode: str, bias: bool) -> set[str]:
    names = {"lora_A", "lora_B", "magnitude"} if mode == "adapter" else {"direction", "magnitude"}
    if bias and mode == "full":
        names.add("bias")
    return names


# ---------------------------------------------------------------- float64 exactness


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_f,out_f,rank", SHAPES)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("detach_norm", [False, True])
def test_float64_matches_dense_autograd(mode, in_f, out_f, rank, leading, detach_norm):
    seed = zlib.crc32(repr((mode, in_f, out_f, rank, leading, detach_norm)).encode()) % 10_000
    layer = make_layer(in_f, out_f, rank, mode, torch.float64, seed, detach_norm=detach_norm)
    assert set(trainable(layer)) == expected_trainable(mode, True)
    gen = _generator(seed + 2)
    x = torch.randn(*leading, in_f, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(*leading, out_f, generator=gen, dtype=torch.float64)

    y, grads = layer_run(layer, x, grad_out)
    y_ref, grads_ref = dense_run(layer, x, grad_out, torch.float64, detach_norm)

    assert y.shape == (*leading, out_f) and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        assert grads[name] is not None, name
        assert grads[name].shape == ref.shape and grads[name].dtype == torch.float64, name
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_detach_norm_changes_the_gradient(mode):
    """The two backwards differ (the exact one differentiates the norm); each matches its own formula above."""
    layer = make_layer(17, 9, 3, mode, torch.float64, 5)
    x = torch.randn(4, 17, dtype=torch.float64)
    g = torch.randn(4, 9, dtype=torch.float64)
    _, exact = layer_run(layer, x, g)
    layer.detach_norm = True
    _, detached = layer_run(layer, x, g)
    name = "lora_A" if mode == "adapter" else "direction"
    assert rel_err(detached[name], exact[name]) > 1e-3
    # dM is the same either way: the norm does not depend on M.
    torch.testing.assert_close(detached["magnitude"], exact["magnitude"])


@pytest.mark.parametrize("mode", MODES)
def test_no_bias_and_trainable_adapter_bias(mode):
    layer = make_layer(17, 3, 2, mode, torch.float64, 11, bias=False)
    assert layer.bias is None
    x = torch.randn(2, 5, 17, dtype=torch.float64)
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    y, grads = layer_run(layer, x, g)
    y_ref, grads_ref = dense_run(layer, x, g, torch.float64, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11)

    # A user may unfreeze the adapter's bias: its gradient must then arrive.
    layer = make_layer(17, 3, 2, mode, torch.float64, 12, bias=True)
    layer.bias.requires_grad_(True)
    y, grads = layer_run(layer, x, g)
    y_ref, grads_ref = dense_run(layer, x, g, torch.float64, False)
    assert "bias" in grads_ref
    torch.testing.assert_close(grads["bias"], grads_ref["bias"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- low precision


def _low_precision_case(mode, dtype, in_f, out_f, rank, seed):
    layer64 = make_layer(in_f, out_f, rank, mode, torch.float64, seed)
    # The low-precision layer holds the float64 values rounded to `dtype`; the truth is float64 on those values.
    layer = make_layer(in_f, out_f, rank, mode, dtype, seed)
    with torch.no_grad():
        for (_, p), (_, q) in zip(layer.named_parameters(), layer64.named_parameters()):
            p.copy_(q.to(dtype))
            q.copy_(p.to(torch.float64))
    gen = _generator(seed + 3)
    x = torch.randn(2, 5, in_f, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(2, 5, out_f, generator=gen, dtype=torch.float64).to(dtype)
    return layer, layer64, x, g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,rank", [(129, 17, 4), (17, 129, 8), (64, 48, 16)])
def test_low_precision_within_baseline_error(mode, dtype, in_f, out_f, rank, dispatched):
    """Error vs float64 truth no worse than a few times autograd's through the dense formula in `dtype`."""
    seed = zlib.crc32(repr((mode, dtype, in_f, out_f, rank)).encode()) % 10_000
    layer, layer64, x, g = _low_precision_case(mode, dtype, in_f, out_f, rank, seed)
    y, grads = layer_run(layer, x, g)
    y_true, grads_true = dense_run(layer64, x, g, torch.float64, False)
    y_base, grads_base = dense_run(layer, x, g, dtype, False)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    checks = [("y", y, y_true, y_base)] + [(n, grads[n], grads_true[n], grads_base[n]) for n in grads_true]
    for name, ours, truth, base in checks:
        assert ours.dtype == dtype, name
        baseline = rel_err(base, truth)
        err = rel_err(ours, truth)
        assert err <= 4.0 * baseline + 4 * eps, f"{name}: error {err:.3g} vs baseline {baseline:.3g}"


# ---------------------------------------------------------------- from_linear, merge, API


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_starts_equal(mode, dtype, bias, dispatched):
    linear = nn.Linear(33, 17, bias=bias, dtype=dtype)
    layer = GradNormLoRPLinear.from_linear(linear, rank=5, alpha=7, mode=mode)
    eps = torch.finfo(dtype).eps
    if dtype == torch.bfloat16:  # M is stored in bf16: M / n is 1 only to bf16 rounding
        torch.testing.assert_close(layer.effective_weight(), linear.weight.detach(), rtol=4 * eps, atol=0)
    else:  # M / n == 1 exactly at init: W == W0 bit for bit
        assert torch.equal(layer.effective_weight(), linear.weight.detach())
    if bias:
        assert torch.equal(layer.bias, linear.bias)
    else:
        assert layer.bias is None
    x = torch.randn(3, 33).to(dtype)
    with torch.no_grad():
        base = linear(x)
        ours = layer(x)
    # The layer computes the same function (rounding aside).
    assert rel_err(ours, base) <= 16 * eps
    assert layer.scaling == pytest.approx(7 / 5)


def test_scaling_is_alpha_over_rank():
    for rank, alpha in [(1, 16), (3, 1.5), (8, 16), (17, 3)]:
        layer = GradNormLoRPLinear(17, 20, rank=rank, alpha=alpha)
        assert layer.scaling == pytest.approx(alpha / rank)
        assert layer.rank == rank and layer.alpha == alpha


@pytest.mark.parametrize("mode", MODES)
def test_parameter_names_and_shapes(mode):
    in_f, out_f, r = 17, 9, 3
    layer = GradNormLoRPLinear(in_f, out_f, rank=r, mode=mode)
    params = dict(layer.named_parameters())
    assert layer.magnitude.shape == (out_f,)
    assert layer.bias.shape == (out_f,)
    if mode == "adapter":
        assert set(params) == {"base_weight", "lora_A", "lora_B", "magnitude", "bias"}
        assert layer.lora_A.shape == (r, in_f)
        assert layer.lora_B.shape == (out_f, r)
        assert layer.base_weight.shape == (out_f, in_f)
        assert layer.direction is None
        assert not layer.base_weight.requires_grad and not layer.bias.requires_grad
        # LoRA's init: B = 0, A not zero, M = ||W0||_row, so W == W0.
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
        torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(layer.base_weight, dim=1))
        torch.testing.assert_close(layer.effective_weight(), layer.base_weight.detach(), rtol=1e-6, atol=0)
    else:
        assert set(params) == {"direction", "magnitude", "bias"}
        assert layer.direction.shape == (out_f, in_f)
        assert layer.lora_A is None and layer.lora_B is None and layer.base_weight is None
        torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(layer.direction, dim=1))
    assert set(trainable(layer)) == expected_trainable(mode, True)


@pytest.mark.parametrize("mode", MODES)
def test_effective_weight_is_the_dense_formula(mode):
    layer = make_layer(20, 13, 4, mode, torch.float64, 21)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    eye = torch.eye(20, dtype=torch.float64)
    with torch.no_grad():
        dense = dense_forward(layer, eye, {**params, "bias": None}, False).T
    torch.testing.assert_close(layer.effective_weight(), dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_merge_gives_same_outputs(mode, bias):
    layer = make_layer(33, 19, 4, mode, torch.float32, 31, bias=bias)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert merged.in_features == 33 and merged.out_features == 19
    assert (merged.bias is None) == (not bias)
    x = torch.randn(2, 5, 33)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.weight.detach(), layer.effective_weight())


def _train_steps(layer, steps, lr=0.05):
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        x = torch.randn(8, layer.in_features)
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("mode", MODES)
def test_training_does_not_touch_the_users_linear(mode):
    linear = nn.Linear(24, 12)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    layer = GradNormLoRPLinear.from_linear(linear, rank=4, mode=mode)
    before = layer.effective_weight()
    _train_steps(layer, 3)
    assert not torch.equal(layer.effective_weight(), before), "training changed nothing"
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    merged = layer.merge()
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip(mode):
    layer = make_layer(17, 11, 3, mode, torch.float32, 41, detach_norm=False)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = GradNormLoRPLinear(17, 11, rank=3, alpha=layer.alpha, mode=mode)
    assert not torch.equal(fresh.effective_weight(), layer.effective_weight())
    fresh.load_state_dict(state)
    for (n1, p1), (n2, p2) in zip(layer.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.requires_grad == p2.requires_grad
    x = torch.randn(2, 5, 17)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_extra_repr_and_shape_preserved_for_1d_input():
    layer = GradNormLoRPLinear(5, 4, rank=2)
    assert "rank=2" in repr(layer) and "mode='adapter'" in repr(layer)
    y = layer(torch.randn(5))
    assert y.shape == (4,)


@pytest.mark.parametrize("mode", MODES)
def test_zero_row_weight_gives_finite_gradients(mode):
    """A linear with an all-zero row (pruned / zero-initialised) must still train: no 0/0 anywhere."""
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight[1] = 0.0
    layer = GradNormLoRPLinear.from_linear(linear, rank=2, mode=mode)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x))
    layer(x).square().sum().backward()
    for name, p in trainable(layer).items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("mode", MODES)
def test_magnitude_gradient_with_a_large_bias(mode):
    layer, layer64, x, g = _low_precision_case(mode, torch.float32, 129, 17, 4, 77)
    with torch.no_grad():
        layer.bias.mul_(100.0)
        layer64.bias.copy_(layer.bias.double())
    _, grads = layer_run(layer, x, g)
    _, grads_true = dense_run(layer64, x, g, torch.float64, False)
    _, grads_base = dense_run(layer, x, g, torch.float32, False)
    for name in grads_true:
        baseline = rel_err(grads_base[name], grads_true[name])
        err = rel_err(grads[name], grads_true[name])
        assert err <= 4.0 * baseline + 4 * torch.finfo(torch.float32).eps, f"{name}: {err:.3g} vs {baseline:.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_autocast_computes_like_a_low_precision_copy(mode):
    """Mixed precision (float32 parameters under torch.autocast) works as nn.Linear does: the layer
    computes in the autocast dtype and float32 gradients reach the float32 parameters."""
    import copy

    layer = make_layer(24, 10, 3, mode, torch.float32, 91)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 5, 24)
    g = torch.randn(2, 5, 10).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    y_low = low(x.to(torch.bfloat16))
    y_low.backward(g)
    assert torch.equal(y, y_low)
    for (name, p), (_, q) in zip(trainable(layer).items(), trainable(low).items()):
        assert p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, q.grad.float()), name
    # Inside a network: the previous nn.Linear hands over a bf16 activation.
    net = nn.Sequential(nn.Linear(6, 24), layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(3, 6)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_input(mode):
    layer = make_layer(17, 9, 3, mode, torch.float64, 101)
    base = torch.randn(17, 2, 6, dtype=torch.float64)
    x = base.permute(1, 2, 0)[:, ::2]  # (2, 3, 17), strided
    assert not x.is_contiguous()
    g = torch.randn(2, 3, 9, dtype=torch.float64)
    y, grads = layer_run(layer, x, g)
    y_ref, grads_ref = dense_run(layer, x.contiguous(), g, torch.float64, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11)
    g_t = torch.randn(2, 9, 3, dtype=torch.float64).transpose(1, 2)  # a strided upstream gradient too
    y, grads = layer_run(layer, x, g_t)
    _, grads_ref = dense_run(layer, x.contiguous(), g_t.contiguous(), torch.float64, False)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11)


def test_public_signatures():
    import inspect

    import gradnormlorp_kernels as gk

    layer = inspect.signature(GradNormLoRPLinear).parameters
    assert list(layer)[:2] == ["in_features", "out_features"]
    for name, value in dict(rank=8, alpha=16, mode="adapter", bias=True, detach_norm=False, device=None,
                            dtype=None).items():
        assert layer[name].default == value, name
    from_linear = inspect.signature(GradNormLoRPLinear.from_linear).parameters
    for name, value in dict(rank=8, alpha=16, mode="adapter").items():
        assert from_linear[name].default == value, name
    wrap = inspect.signature(gk.wrap).parameters
    for name, value in dict(target_modules="all-linear", rank=8, alpha=16, mode="adapter").items():
        assert wrap[name].default == value, name
    assert list(inspect.signature(gk.merge).parameters) == ["model"]


@pytest.mark.parametrize("mode", ["adapter", "full"])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(mode, backend):
    """The ops are torch.library custom ops with fake implementations, so a whole layer compiles without graph
    breaks (on a GPU, `mode="reduce-overhead"` then replays it from a CUDA graph) and gives the same results."""
    layer = GradNormLoRPLinear.from_linear(nn.Linear(24, 40), rank=4, alpha=8, mode=mode)
    if layer.lora_B is not None:
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 7, 24, requires_grad=True)
    grad = torch.randn(3, 7, 40)

    def run(module):
        out = module(x)
        out.backward(grad)
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return [out.detach()] + grads

    torch._dynamo.reset()
    expected = run(layer)
    got = run(torch.compile(layer, fullgraph=True, backend=backend))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
