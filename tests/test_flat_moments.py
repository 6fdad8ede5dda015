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


@pytest.mark.parametrize("numels, count, expected", [
    ([4, 4, 4, 4, 11, 11, 11] * 4, 4, [(0, 7), (7, 14), (14, 21), (21, 28)]),  # LLaMA's 7 matrices a layer
    ([1, 1, 1, 100], 4, [(0, 3), (3, 4)]),  # a large last matrix is a run of its own
    ([100, 1, 1, 1], 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ([5], 4, [(0, 1)]),
    ([3, 3], 1, [(0, 2)]),
])
def test_parts_are_runs_of_about_equal_size(numels, count, expected):
    states = [{"exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n), "step": torch.zeros(()),
               "skipped": torch.zeros(())} for n in numels]
    flat = FlatMoments(states, numels, torch.device("cpu"), parts=count)
    assert [(part.first, part.last) for part in flat.parts] == expected
    for part in flat.parts:
        assert part.lo == flat.spans[part.first][0]
        assert part.hi == (flat.spans[part.last][0] if part.last < len(numels) else flat.total)
        assert torch.equal(part.starts + part.lo, flat.starts[part.first:part.last])
        assert torch.equal(part.numels, flat.numels[part.first:part.last])


@pytest.mark.parametrize("state_bits", [8, 32])
def test_updating_part_by_part_gives_the_bits_of_one_update(state_bits):
    """What a captured step does on its lanes (each part's own launch) against one launch over all."""
    generator = torch.Generator().manual_seed(1)
    results = []
    for parts in (1, 3):
        states = _states(state_bits)
        flat = FlatMoments(states, [s["exp_avg"].numel() for s in states], torch.device("cpu"), parts=parts)
        assert len(flat.parts) == parts
        grad = torch.randn(flat.total, generator=generator.manual_seed(1))
        grad[flat.spans[1][0] + 3] = float("nan")  # the second matrix's step is skipped, the others' are not
        codes = (torch.linspace(-1, 1, 256), torch.linspace(0, 1, 256)) if state_bits == 8 else (None, None)
        scale = torch.full((), 0.5)
        if parts == 1:
            directions = flat.update(grad, *codes, 0.9, 0.999, 1e-8, scale, torch.float32)
        else:
            directions = torch.cat([flat.update(grad[part.lo:part.hi], *codes, 0.9, 0.999, 1e-8, scale, torch.float32,
                                                part) for part in flat.parts])
        results.append((directions, [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in states]))
    (whole, whole_states), (parted, parted_states) = results
    assert torch.equal(whole, parted)
    assert whole_states[1]["skipped"].item() == 1 and whole_states[0]["skipped"].item() == 0
    for a, b in zip(whole_states, parted_states):
        for key in a:
            assert torch.equal(a[key], b[key]), key
