"""Bad input gets a clear error that names the argument and its allowed values, and changes nothing."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch
from torch import nn

import gradnormlorp_kernels as gk
from gradnormlorp_kernels import GradNormLoRPAdamW, GradNormLoRPLinear, use_backend


@pytest.fixture(autouse=True)
def _reference_ops():
    with use_backend("reference"):
        yield


def snapshot(module: nn.Module) -> dict:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    kinds = {n: type(m) for n, m in module.named_modules()}
    return {"state": state, "flags": flags, "kinds": kinds}


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["kinds"] == before["kinds"]
    assert after["flags"] == before["flags"]
    assert set(after["state"]) == set(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("mode", ["adapter", "full"])
@pytest.mark.parametrize("rank", [0, -1, 18, 2.5, True, "4", None])
def test_layer_bad_rank(mode, rank):
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 17\].*in_features=17.*out_features=20"):
        GradNormLoRPLinear(17, 20, rank=rank, mode=mode)


@pytest.mark.parametrize("rank", [0, 13])
def test_from_linear_bad_rank_leaves_linear_alone(rank):
    linear = nn.Linear(12, 30)
    before = snapshot(linear)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 12\]"):
        GradNormLoRPLinear.from_linear(linear, rank=rank)
    assert_unchanged(linear, before)


@pytest.mark.parametrize("mode", ["Adapter", "lora", "", None, "dora"])
def test_layer_unknown_mode(mode):
    with pytest.raises(ValueError, match=r"mode must be one of \('adapter', 'full'\)"):
        GradNormLoRPLinear(8, 8, rank=2, mode=mode)
    with pytest.raises(ValueError, match=r"mode must be one of \('adapter', 'full'\)"):
        GradNormLoRPLinear.from_linear(nn.Linear(8, 8), rank=2, mode=mode)


@pytest.mark.parametrize("name,kwargs", [
    ("in_features", dict(in_features=0, out_features=4)),
    ("out_features", dict(in_features=4, out_features=-3)),
    ("in_features", dict(in_features=4.0, out_features=4)),
])
def test_layer_bad_sizes(name, kwargs):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
        GradNormLoRPLinear(**kwargs, rank=1)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "16", None])
def test_layer_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        GradNormLoRPLinear(8, 8, rank=2, alpha=alpha)


def test_from_linear_wants_a_linear():
    with pytest.raises(TypeError, match=r"linear must be a torch\.nn\.Linear, got Conv1d"):
        GradNormLoRPLinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_layer_wrong_in_features(mode):
    layer = GradNormLoRPLinear(7, 5, rank=2, mode=mode)
    before = snapshot(layer)
    for shape in [(3, 6), (2, 4, 8), (7, 1)]:
        with pytest.raises(ValueError, match=rf"in_features=7, got shape {re.escape(str(shape))}"):
            layer(torch.randn(shape))
    with pytest.raises(ValueError, match="in_features=7"):
        layer(torch.randn(()))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        layer([[0.0] * 7])
    assert_unchanged(layer, before)


@pytest.mark.parametrize("mode", ["adapter", "full"])
@pytest.mark.parametrize("layer_dtype,input_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.int64),
])
def test_layer_dtype_mismatch(mode, layer_dtype, input_dtype):
    layer = GradNormLoRPLinear(6, 4, rank=2, mode=mode, dtype=layer_dtype)
    before = snapshot(layer)
    x = torch.ones(3, 6, dtype=input_dtype)
    with pytest.raises(TypeError, match=rf"input dtype {input_dtype} does not match the layer's dtype {layer_dtype}"):
        layer(x)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_layer_device_mismatch(mode):
    layer = GradNormLoRPLinear(6, 4, rank=2, mode=mode)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="input is on meta but the layer's weights are on cpu"):
        layer(torch.empty(3, 6, device="meta"))
    assert_unchanged(layer, before)
    meta_layer = GradNormLoRPLinear(6, 4, rank=2, mode=mode, device="meta")
    with pytest.raises(RuntimeError, match="input is on cpu but the layer's weights are on meta"):
        meta_layer(torch.randn(3, 6))


# ---------------------------------------------------------------- wrap / merge


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 6)
        self.lm_head = nn.Linear(6, 3)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(rank=7), r"cannot wrap 'b' \(Linear\(in_features=20, out_features=6.*rank must be an integer in \[1, 6\]"),
    (dict(rank=0), r"rank must be an integer in \[1, 12\]"),
    (dict(mode="ful"), r"mode must be one of \('adapter', 'full'\)"),
    (dict(target_modules=[]), r"target_modules must be 'all-linear', a regex or a non-empty list"),
    (dict(target_modules=["a", 3]), r"target_modules must be"),
    (dict(target_modules="a(["), r"target_modules must be 'all-linear', a list of module names or a valid regex"),
    (dict(target_modules=["c"]), r"target_modules=\['c'\] matched no nn\.Linear.*'a', 'b', 'lm_head'"),
    (dict(target_modules="x.*"), r"matched no nn\.Linear"),
])
def test_wrap_bad_arguments_change_nothing(kwargs, pattern):
    model = Net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        gk.wrap(model, **kwargs)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- the optimizer


def params():
    return [nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8))]


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(lr=-1e-3), r"lr must be in \[0.0, inf\]"),
    (dict(lr=math.nan), r"lr must be a finite number"),
    (dict(lr="1e-3"), r"lr must be a finite number"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0.0, 1.0\)"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0.0, 1.0\)"),
    (dict(betas=(0.9,)), r"betas must be a pair \(beta1, beta2\)"),
    (dict(betas=0.9), r"betas must be a pair"),
    (dict(eps=0.0), r"eps must be in \(0.0, inf\]"),
    (dict(eps=-1e-8), r"eps must be in \(0.0"),
    (dict(weight_decay=-0.01), r"weight_decay must be in \[0.0, inf\]"),
    (dict(weight_decay=math.inf), r"weight_decay must be a finite number"),
    (dict(rank=0), r"rank must be an integer >= 1"),
    (dict(rank=-3), r"rank must be an integer >= 1"),
    (dict(rank=2.0), r"rank must be an integer >= 1"),
    (dict(update_proj_gap=0), r"update_proj_gap must be an integer >= 1"),
    (dict(scale=0.0), r"scale must be in \(0.0"),
    (dict(proj_type="both"), r"proj_type must be one of \('std', 'left', 'right', 'two_sided'\), got 'both'"),
    (dict(refresh="qr"), r"refresh must be one of \('randomized', 'svd'\), got 'qr'"),
    (dict(state_bits=16), r"state_bits must be one of \(8, 32\), got 16"),
    (dict(state_bits=4), r"state_bits must be one of \(8, 32\)"),
    (dict(seed=-1), r"seed must be an integer >= 0"),
    (dict(cuda_graph="yes"), r"cuda_graph must be True or False, got 'yes'"),
])
def test_optimizer_bad_hyperparameters(kwargs, pattern):
    ps = params()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=pattern):
        GradNormLoRPAdamW([{"params": ps[:1], "rank": 4}, {"params": ps[1:]}], **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("group_kwargs,pattern", [
    (dict(proj_type="upper"), r"proj_type must be one of"),
    (dict(refresh="power"), r"refresh must be one of"),
    (dict(state_bits=7), r"state_bits must be one of \(8, 32\)"),
    (dict(rank=0), r"rank must be an integer >= 1"),
    (dict(lr=-1.0), r"lr must be in"),
])
def test_optimizer_bad_group_override(group_kwargs, pattern):
    ps = params()
    with pytest.raises(ValueError, match=pattern):
        GradNormLoRPAdamW([{"params": ps[:1], "rank": 4, **group_kwargs}, {"params": ps[1:]}])


def test_optimizer_without_bitsandbytes_refuses_8bit_states_at_construction(monkeypatch):
    from gradnormlorp_kernels.ops import quant8

    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # the import fails as if not installed
    quant8._dynamic_map_cpu.cache_clear()
    quant8._dynamic_map_on.cache_clear()
    try:
        w = nn.Parameter(torch.randn(8, 8))
        with pytest.raises(ImportError, match=r"need bitsandbytes .*state_bits=32"):
            GradNormLoRPAdamW([w], state_bits=8)
        assert GradNormLoRPAdamW([w], state_bits=32).state_dict()["state"] == {}
    finally:
        quant8._dynamic_map_cpu.cache_clear()
        quant8._dynamic_map_on.cache_clear()


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_optimizer_rank_above_matrix(shape):
    with pytest.raises(ValueError, match=rf"rank=9 is larger than the {re.escape(str(shape))} matrix allows \(at most 8\)"):
        GradNormLoRPAdamW([{"params": [nn.Parameter(torch.randn(shape))], "rank": 9}])
    # At the limit it is fine.
    GradNormLoRPAdamW([{"params": [nn.Parameter(torch.randn(shape))], "rank": 8}])


@pytest.mark.parametrize("shape", [(16,), (4, 4, 4), ()])
def test_optimizer_projected_must_be_2d(shape):
    with pytest.raises(ValueError, match=r"projected parameters must be 2-D weight matrices.*project=False"):
        GradNormLoRPAdamW([{"params": [nn.Parameter(torch.randn(shape))], "rank": 1}])


def test_optimizer_model_constructor_rank_too_large():
    model = nn.Sequential(GradNormLoRPLinear(16, 24, mode="full"), GradNormLoRPLinear(24, 8, mode="full"))
    with pytest.raises(ValueError, match=r"rank=12 is larger than the \(8, 24\) matrix allows \(at most 8\)"):
        GradNormLoRPAdamW(model, rank=12)


def test_rejected_param_group_changes_nothing():
    w, v = params()
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 4}], state_bits=32)
    groups_before = [dict(g) for g in opt.param_groups]
    extra = nn.Parameter(torch.randn(5, 5))
    for bad, pattern in [
        ({"params": [v], "rank": 2}, r"2-D"),
        ({"params": [extra], "rank": 6}, r"rank=6 is larger"),
        ({"params": [extra], "proj_type": "wide"}, r"proj_type must be one of"),
        ({"params": [extra, v], "rank": 2, "project": True}, r"2-D"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1
        assert [dict(g) for g in opt.param_groups] == groups_before
    # A later GaLore-style group (with "rank") is projected, as in the constructor.
    opt.add_param_group({"params": [extra], "rank": 2})
    assert opt.param_groups[-1]["project"] is True
    opt.add_param_group({"params": [v]})
    assert opt.param_groups[-1]["project"] is False


def test_optimizer_needs_parameters():
    with pytest.raises(ValueError, match="empty parameter list"):
        GradNormLoRPAdamW([])
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="empty parameter list"):
        GradNormLoRPAdamW(frozen)


def test_wrap_a_single_linear_points_to_from_linear():
    linear = nn.Linear(4, 4)
    before = snapshot(linear)
    with pytest.raises(TypeError, match=r"GradNormLoRPLinear\.from_linear"):
        gk.wrap(linear)
    assert_unchanged(linear, before)


def test_wrap_full_mode_refuses_a_tied_weight():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot wrap 'lm_head' in mode='full': its weight is tied to "
                                         r"'model\.embed_tokens\.weight'"):
        gk.wrap(model, ["lm_head", "q_proj"], rank=2, mode="full")
    assert_unchanged(model, before)
    # Adapter mode keeps W0 frozen, so a tied head can take an adapter; the embedding is left as it was.
    gk.wrap(model, ["lm_head"], rank=2, mode="adapter")
    assert isinstance(model.lm_head, GradNormLoRPLinear)
    assert model.lm_head.base_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
