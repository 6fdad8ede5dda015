"""wrap()/merge() on plain PyTorch models and on tiny Hugging Face LLaMA / RoBERTa models (no downloads)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradnormlorp_kernels as gk
from gradnormlorp_kernels import GradNormLoRPAdamW, GradNormLoRPLinear

transformers = pytest.importorskip("transformers")

# Reference ops unless a test takes the `dispatched` fixture (see conftest.py).
pytestmark = pytest.mark.usefixtures("reference_unless_dispatched")


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROBERTA_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_roberta(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(config).eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # RoBERTa reserves ids 0..2 (padding is 1): keep them out.
    return torch.randint(3, 64, (batch, length), generator=gen)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def linear_names(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, GradNormLoRPLinear))}


def wrapped_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, GradNormLoRPLinear)}


# ---------------------------------------------------------------- plain PyTorch


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 12)
        self.block = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
        self.norm = nn.LayerNorm(12)
        self.lm_head = nn.Linear(12, 10, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(self.block(self.embed(ids))))


@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_toy_all_linear_skips_head_and_is_identical(mode):
    model = Toy()
    ids = torch.randint(0, 10, (3, 5))
    before = model(ids).detach()
    out = gk.wrap(model, "all-linear", rank=4, alpha=8, mode=mode)
    assert out is model
    assert wrapped_names(model) == {"block.0", "block.2"}
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)
    assert model.block[0].rank == 4 and model.block[0].scaling == 2.0 and model.block[0].mode == mode


def test_toy_regex_and_names():
    model = Toy()
    gk.wrap(model, r"block\.2", rank=2)
    assert wrapped_names(model) == {"block.2"}
    model = Toy()
    gk.wrap(model, ["lm_head"], rank=2)  # a head is wrapped when named
    assert wrapped_names(model) == {"lm_head"}
    model = Toy()
    gk.wrap(model, ["0", "lm_head"], rank=2)
    assert wrapped_names(model) == {"block.0", "lm_head"}


def test_wrap_a_bare_linear_model_is_an_error_not_a_silent_noop():
    model = Toy()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="target_modules"):
        gk.wrap(model, ["does_not_exist"])
    with pytest.raises(ValueError, match="target_modules"):
        gk.wrap(model, r"nothing\.here")
    # Nothing was changed, nothing was frozen.
    assert wrapped_names(model) == set()
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


# ---------------------------------------------------------------- transformers


def test_llama_all_linear_adapter_mode():
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    gk.wrap(model, "all-linear", rank=4, alpha=8)
    # W == W0 at init and LLaMA's projections have no bias: the logits are bit-identical.
    assert torch.equal(logits(model, ids), before)
    expected = {f"model.layers.{i}.{part}.{name}" for i in range(2) for part, names in
                (("self_attn", LLAMA_LINEARS[:4]), ("mlp", LLAMA_LINEARS[4:])) for name in names}
    assert wrapped_names(model) == expected
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    # Adapter mode: only the adapters train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{p}" for layer in expected for p in ("lora_A", "lora_B", "magnitude")}


def test_llama_full_mode_trains_directions_and_the_rest():
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    gk.wrap(model, "all-linear", rank=4, mode="full")
    assert torch.equal(logits(model, ids), before)
    for name, module in model.named_modules():
        if isinstance(module, GradNormLoRPLinear):
            assert module.direction.requires_grad and module.magnitude.requires_grad
            assert module.base_weight is None
    assert all(p.requires_grad for p in model.parameters())


def test_llama_list_of_names_and_regex():
    model = tiny_llama()
    gk.wrap(model, ["q_proj", "v_proj"], rank=2)
    assert wrapped_names(model) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    model = tiny_llama()
    pattern = r"model\.layers\.1\.mlp\.(up|down)_proj"
    gk.wrap(model, pattern, rank=2)
    assert wrapped_names(model) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert all(re.fullmatch(pattern, n) for n in wrapped_names(model))
    model = tiny_llama()
    gk.wrap(model, ["lm_head"], rank=2)
    assert wrapped_names(model) == {"lm_head"}


def test_roberta_classifier_untouched():
    model = tiny_roberta()
    ids = tokens()
    before = logits(model, ids)
    gk.wrap(model, "all-linear", rank=4)
    names = wrapped_names(model)
    assert len(names) == 12 and not any(n.startswith("classifier") for n in names)
    assert all(any(n.endswith(s) for s in ROBERTA_LINEARS) for n in names)
    assert type(model.classifier.dense) is nn.Linear and type(model.classifier.out_proj) is nn.Linear
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    # Named explicitly, the head is wrapped.
    model = tiny_roberta()
    gk.wrap(model, ["classifier.out_proj"], rank=2)
    assert wrapped_names(model) == {"classifier.out_proj"}


def test_transformers_nothing_matched_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched no nn\.Linear.*q_proj"):
        gk.wrap(model, ["qproj"])
    assert wrapped_names(model) == set()
    assert all(p.requires_grad for p in model.parameters())


def _train(model, ids, labels, steps, optimizer, loss_fn):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(input_ids=ids), labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _lm_loss(out, labels):
    return nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))


def _cls_loss(out, labels):
    return nn.functional.cross_entropy(out.logits, labels)


@pytest.mark.parametrize("mode", ["adapter", "full"])
@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_train_then_merge_gives_same_logits(arch, mode, dispatched):
    model = tiny_llama(3) if arch == "llama" else tiny_roberta(3)
    ids = tokens(seed=4)
    if arch == "llama":
        labels, loss_fn = tokens(seed=5), _lm_loss
    else:
        labels, loss_fn = torch.tensor([0, 2]), _cls_loss
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gk.wrap(model, "all-linear", rank=4, alpha=8, mode=mode)
    optimizer = GradNormLoRPAdamW(model, lr=2e-2, rank=4, update_proj_gap=2, state_bits=32)
    losses = _train(model, ids, labels, 4, optimizer, loss_fn)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    trained = logits(model, ids)

    if mode == "adapter":
        # Everything outside the adapters kept its value.
        for name, p in model.named_parameters():
            if not name.endswith(("lora_A", "lora_B", "magnitude")):
                key = name.replace(".base_weight", ".weight")
                assert torch.equal(p, frozen_before[key]), name

    merged = gk.merge(model)
    assert merged is model
    assert not any(isinstance(m, GradNormLoRPLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    # Every linear is back, with the original names (state_dict keys of a plain model).
    assert set(dict(model.named_parameters())) == set(frozen_before)
    torch.testing.assert_close(logits(model, ids), trained, rtol=1e-4, atol=1e-5)
    # Training moved the function away from the start (the check above is not trivial).
    assert not torch.allclose(trained, logits(tiny_llama(3) if arch == "llama" else tiny_roberta(3), ids))


def test_merge_keeps_dtype_and_module_level_merge():
    model = Toy().to(torch.bfloat16)
    gk.wrap(model, "all-linear", rank=2, mode="full")
    assert model.block[0].direction.dtype == torch.bfloat16
    gk.merge(model)
    assert type(model.block[0]) is nn.Linear and model.block[0].weight.dtype == torch.bfloat16
    layer = GradNormLoRPLinear(5, 3, rank=2)
    linear = gk.merge(layer)
    assert type(linear) is nn.Linear
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), layer(x))


def test_full_mode_wrap_does_not_alias_state_dict_keys():
    """After wrap the state_dict uses the layer's names; after merge the original `.weight` names return."""
    model = Toy()
    keys = set(model.state_dict())
    gk.wrap(model, "all-linear", rank=2, mode="full")
    wrapped = set(model.state_dict())
    assert "block.0.direction" in wrapped and "block.0.magnitude" in wrapped and "block.0.weight" not in wrapped
    gk.merge(model)
    assert set(model.state_dict()) == keys


class SharedLinear(nn.Module):
    """One nn.Linear used in two places (weight sharing by module reuse)."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.first = nn.Sequential(shared, nn.Tanh())
        self.second = nn.Sequential(shared, nn.Tanh())
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.other(self.second(self.first(x)))


@pytest.mark.parametrize("mode", ["adapter", "full"])
@pytest.mark.parametrize("target", ["all-linear", ["second.0"], ["first.0"]])
def test_shared_module_is_replaced_everywhere(mode, target):
    model = SharedLinear()
    x = torch.randn(3, 8)
    before = model(x).detach()
    gk.wrap(model, target, rank=2, mode=mode)
    assert isinstance(model.first[0], GradNormLoRPLinear) and model.first[0] is model.second[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # Train it: both uses see the one trained layer, and merge keeps them shared.
    opt = GradNormLoRPAdamW(model, lr=5e-2, rank=2, state_bits=32)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    trained = model(x).detach()
    assert not torch.allclose(trained, before)
    gk.merge(model)
    assert type(model.first[0]) is nn.Linear and model.first[0] is model.second[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_wrapped_llama_trains_under_autocast(mode):
    """Mixed precision as Hugging Face's Trainer(bf16=True) runs it: float32 weights, torch.autocast."""
    model = tiny_llama(7)
    gk.wrap(model, "all-linear", rank=4, mode=mode)
    ids, labels = tokens(seed=8), tokens(seed=9)
    optimizer = GradNormLoRPAdamW(model, lr=2e-2, rank=4, state_bits=32)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids)
        loss = _lm_loss(out, labels)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), name
        optimizer.step()
        losses.append(float(loss.detach()))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GradNormLoRPLinear) and layer.magnitude.grad is not None
    assert losses[-1] < losses[0]
