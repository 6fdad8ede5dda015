"""`FlatMoments`: a group's Adam states laid end to end as views, and `holds`, the check the graphed step makes
before every launch that the states are still those views."""

import pytest
import torch

from gradnormlorp_kernels import GradNormLoRPAdamW
from gradnormlorp_kernels._flat_moments import FlatMoments

# Large enough that rank-4 moments are 8-bit (one kind of moments per layout).
SHAPES = [(40, 1100), (1100, 40), (33, 1031)]


def _states(state_bits):
    """The optimizer's states (8-bit or float32 moments) after two steps, on the CPU."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-2, rank=4, state_bits=state_bits)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    states = [optimizer.state[p] for p in params]
    assert all(("absmax_exp_avg" in s) == (state_bits == 8) for s in states)
    return states


@pytest.mark.parametrize("state_bits", [8, 32])
def test_layout_keeps_the_values_and_holds_its_own_views(state_bits):
    states = _states(state_bits)
    before = [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in states]
    flat = FlatMoments(states, [s["exp_avg"].numel() for s in states], torch.device("cpu"))
    for state, saved in zip(states, before):
        for key, value in saved.items():
            assert torch.equal(state[key], value), key
            assert state[key].shape == value.shape, key
    assert flat.holds(states)
    assert flat.holds(list(states))  # the same dicts in a new list


@pytest.mark.parametrize("state_bits", [8, 32])
def test_holds_is_false_once_anything_moved(state_bits):
    states = _states(state_bits)
    flat = FlatMoments(states, [s["exp_avg"].numel() for s in states], torch.device("cpu"))
    assert not flat.holds(states[:-1]), "a state fewer"
    assert not flat.holds(states[::-1]), "the states in another order"
    assert not flat.holds([dict(states[0])] + states[1:]), "a state dict replaced by a copy"
    keys = ["exp_avg", "exp_avg_sq", "step", "skipped"] + (["absmax_exp_avg", "absmax_exp_avg_sq"] if state_bits == 8 else [])
    for key in keys:
        view = states[1][key]
        states[1][key] = view.clone()  # the same values, no longer the layout's view
        assert not flat.holds(states), key
        states[1][key] = view
        assert flat.holds(states), key
